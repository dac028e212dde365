"""REINFORCE and clipped (RLOO/GRPO) losses: hand-computed values, gradients, accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.grpo import clipped_policy_loss
from posttrain.algos.reinforce import reinforce_loss
from posttrain.online import accumulation_weight
from posttrain.ops import selective_log_softmax

LN = math.log


def test_reinforce_loss_hand_computed():
    """Row 0: tokens logp -1, -2 (third masked), adv 2 -> -2 * (-3) = 6.
    Row 1: one token logp -0.5, adv -1 -> -(-1) * (-0.5) = -0.5. Mean over rows: 2.75."""
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, m = reinforce_loss(logp, mask, adv)
    assert loss.item() == pytest.approx(2.75)
    assert m["loss/policy"].item() == pytest.approx(2.75)


def test_reinforce_loss_with_k3_kl():
    """One token, adv 0: pi = 0.5, ref = 0.25. k3 = ref/pi - log(ref/pi) - 1 = 0.5 + ln 2 - 1.
    k1 = ln 0.5 - ln 0.25 = ln 2. With kl_coef 0.1 the loss is 0.1 * k."""
    logp = torch.tensor([[LN(0.5)]])
    ref = torch.tensor([[LN(0.25)]])
    mask = torch.ones(1, 1)
    loss, m = reinforce_loss(logp, mask, torch.zeros(1), ref_logp=ref, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * (0.5 + LN(2) - 1))
    assert m["loss/kl"].item() == pytest.approx(loss.item())
    loss, _ = reinforce_loss(
        logp, mask, torch.zeros(1), ref_logp=ref, kl_coef=0.1, kl_estimator="k1"
    )
    assert loss.item() == pytest.approx(0.1 * LN(2))


def test_clipped_loss_hand_computed():
    """eps = 0.2, token mean over four tokens of one row:
      ratio 1.5, A=+1: min(1.5, 1.2) = 1.2   -> -1.2  (clipped)
      ratio 0.5, A=+1: min(0.5, 0.8) = 0.5   -> -0.5
      ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 -> 0.8  (clipped)
      ratio 1.5, A=-1: min(-1.5, -1.2) = -1.5 -> 1.5
    loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.15; clip fraction 2/4; clipped tokens get no gradient."""
    old = torch.zeros(1, 4)
    logp = torch.tensor([[LN(1.5), LN(0.5), LN(0.5), LN(1.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = clipped_policy_loss(logp, old, adv, torch.ones(1, 4), reduction="token_mean")
    assert loss.item() == pytest.approx(0.15)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dlogp of -ratio * A / 4 = -ratio * A / 4 on unclipped tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.125, 0.0, 0.375]]))


def test_clip_higher():
    """eps_high = 0.6: ratio 1.5 with A=+1 is no longer clipped -> loss -1.5."""
    logp = torch.tensor([[LN(1.5)]])
    loss, m = clipped_policy_loss(
        logp, torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), clip_range_high=0.6
    )
    assert loss.item() == pytest.approx(-1.5)
    assert m["clip_fraction"].item() == 0.0


def test_reductions_hand_computed():
    """ratio 1 everywhere, per-token loss = -A: row 0 (A=1) two tokens, row 1 (A=3) one token.
    token_mean: (-1 - 1 - 3) / 3 = -5/3; seq_mean: mean(-1, -3) = -2;
    fixed (normaliser 4): -5 / (2 * 4) = -0.625."""
    logp = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, 3.0])
    want = {"token_mean": -5 / 3, "seq_mean": -2.0, "fixed": -0.625}
    for red, value in want.items():
        loss, _ = clipped_policy_loss(logp, logp, adv, mask, reduction=red, normaliser=4)
        assert loss.item() == pytest.approx(value), red


def test_clipped_loss_with_k3_kl_term():
    """ratio 1, A=0, one token pi=0.5 vs ref=0.25: loss = beta * k3 = 0.04 * (ln 2 - 0.5)."""
    logp = torch.tensor([[LN(0.5)]])
    loss, m = clipped_policy_loss(
        logp,
        logp,
        torch.zeros(1),
        torch.ones(1, 1),
        ref_logp=torch.tensor([[LN(0.25)]]),
        kl_coef=0.04,
    )
    assert loss.item() == pytest.approx(0.04 * (LN(2) - 0.5))
    assert m["loss/kl"].item() == pytest.approx(loss.item())


def _policy(seed=0, B=4, T=5, V=7, D=3):
    """A tiny differentiable 'policy': logits = x @ W, with ids, a ragged mask and advantages."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=g)
    W = torch.randn(D, V, generator=g, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([5, 2, 4, 1])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g)
    return x, W, ids, mask, adv


def _logp(x, W, ids):
    return selective_log_softmax(x @ W, ids)  # (B, T)


def test_zero_advantage_gives_zero_policy_gradient():
    x, W, ids, mask, _ = _policy()
    zero = torch.zeros(4)
    loss, _ = reinforce_loss(_logp(x, W, ids), mask, zero)
    loss.backward()
    assert torch.count_nonzero(W.grad) == 0
    W.grad = None
    logp = _logp(x, W, ids)
    loss, _ = clipped_policy_loss(logp, logp.detach() + 0.3, zero, mask)
    loss.backward()
    assert torch.count_nonzero(W.grad) == 0


def test_one_epoch_clipped_loss_equals_reinforce_with_advantage():
    """On-policy (old_logp = logp), ratio = 1 and d ratio = d logp, so the clipped loss with the
    'fixed' reduction and normaliser 1, sum_t -A_i ratio_it / B, has REINFORCE's gradient."""
    x, W, ids, mask, adv = _policy()
    loss_r, _ = reinforce_loss(_logp(x, W, ids), mask, adv)
    (g_r,) = torch.autograd.grad(loss_r, W)
    logp = _logp(x, W, ids)
    loss_c, m = clipped_policy_loss(logp, logp.detach(), adv, mask, reduction="fixed", normaliser=1)
    (g_c,) = torch.autograd.grad(loss_c, W)
    torch.testing.assert_close(g_c, g_r)
    assert m["ratio"].item() == 1.0 and m["clip_fraction"].item() == 0.0


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean", "fixed"])
def test_accumulation_1x4_equals_4x1(reduction):
    """Four micro-batches of one row, each loss scaled by accumulation_weight, sum to the gradient
    of one batch of four rows, for every reduction (ragged lengths included)."""
    x, W, ids, mask, adv = _policy()
    old = _logp(x, W, ids).detach() - 0.1  # ratio != 1, some tokens clipped

    def loss_of(rows):
        logp = _logp(x[rows], W, ids[rows])
        loss, _ = clipped_policy_loss(
            logp, old[rows], adv[rows], mask[rows], reduction=reduction, normaliser=5
        )
        return loss

    (whole,) = torch.autograd.grad(loss_of(torch.arange(4)), W)
    total = torch.zeros_like(W)
    for i in range(4):
        rows = torch.tensor([i])
        w = accumulation_weight(mask[rows], reduction, step_rows=4, step_tokens=float(mask.sum()))
        (g,) = torch.autograd.grad(loss_of(rows) * w, W)
        total += g
    torch.testing.assert_close(total, whole)


def test_reinforce_accumulation_1x4_equals_4x1():
    x, W, ids, mask, adv = _policy()
    loss, _ = reinforce_loss(_logp(x, W, ids), mask, adv)
    (whole,) = torch.autograd.grad(loss, W)
    total = torch.zeros_like(W)
    for i in range(4):
        r = slice(i, i + 1)
        loss, _ = reinforce_loss(_logp(x[r], W, ids[r]), mask[r], adv[r])
        w = accumulation_weight(mask[r], "seq_mean", step_rows=4, step_tokens=0)
        (g,) = torch.autograd.grad(loss * w, W)
        total += g
    torch.testing.assert_close(total, whole)
