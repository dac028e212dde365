"""Advantages and baselines against worked examples and plain loops."""

from __future__ import annotations

import pytest
import torch

from posttrain.advantages import (
    MovingAverageBaseline,
    batch_mean_baseline,
    gae,
    group_normalized_advantages,
    rloo_advantages,
    whiten,
)


def test_batch_mean_baseline_and_valid():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert batch_mean_baseline(r).item() == pytest.approx(4.0)
    valid = torch.tensor([True, True, True, False])
    assert batch_mean_baseline(r, valid).item() == pytest.approx(2.0)


def test_moving_average_baseline_uses_past_batches_and_resumes():
    """decay 0.5: first call returns its own mean 2 (state 2); second batch mean 6 -> returns 2,
    state 0.5*2 + 0.5*6 = 4; third returns 4."""
    ma = MovingAverageBaseline(decay=0.5)
    assert ma(torch.tensor([1.0, 3.0])).item() == pytest.approx(2.0)
    assert ma(torch.tensor([6.0, 6.0])).item() == pytest.approx(2.0)
    state = ma.state_dict()
    other = MovingAverageBaseline(decay=0.9)
    other.load_state_dict(state)
    assert other(torch.tensor([0.0])).item() == pytest.approx(4.0)
    assert ma(torch.tensor([0.0])).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        MovingAverageBaseline(decay=1.0)


def test_rloo_worked_example():
    """Group [1, 2, 6]: others' means are (2+6)/2=4, (1+6)/2=3.5, (1+2)/2=1.5
    -> advantages -3, -1.5, 4.5. Group [0, 1, 0]: 0-0.5, 1-0, 0-0.5."""
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 1.0, 0.0])
    adv = rloo_advantages(r, 3)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5, -0.5, 1.0, -0.5]))
    # RLOO advantages equal k/(k-1) times the group-centred rewards
    centred = group_normalized_advantages(r, 3, scale=False)
    torch.testing.assert_close(adv, centred * 3 / 2)


def test_rloo_with_invalid_rows():
    """Group [1, 2, nan(invalid), 6]: valid rows 1, 2, 6 as in the 3-row example; invalid -> 0."""
    r = torch.tensor([1.0, 2.0, 0.0, 6.0])
    valid = torch.tensor([True, True, False, True])
    adv = rloo_advantages(r, 4, valid=valid)
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 0.0, 4.5]))
    # a lone valid row has no baseline -> 0
    adv = rloo_advantages(torch.tensor([5.0, 0.0]), 2, valid=torch.tensor([True, False]))
    torch.testing.assert_close(adv, torch.zeros(2))
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError):
        rloo_advantages(torch.ones(5), 2)


def test_group_normalized_worked_example():
    """Group [1, 2, 6]: mean 3, centred [-2, -1, 3], sample var (4+1+9)/2 = 7, std sqrt(7).
    Group [4, 4, 4]: all equal -> 0 (not NaN)."""
    r = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    adv = group_normalized_advantages(r, 3, eps=0.0 + 1e-4)
    s = 7**0.5 + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0]))
    # matches torch's own (r - mean) / (std + eps) per group
    g = r.view(2, 3)
    ref = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)).view(-1)
    torch.testing.assert_close(adv, ref)
    unscaled = group_normalized_advantages(r, 3, scale=False)
    torch.testing.assert_close(unscaled, torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0]))


def test_group_normalized_with_invalid_rows():
    r = torch.tensor([1.0, 100.0, 2.0, 6.0])
    valid = torch.tensor([True, False, True, True])
    adv = group_normalized_advantages(r, 4, valid=valid)
    s = 7**0.5 + 1e-4
    torch.testing.assert_close(adv, torch.tensor([-2 / s, 0.0, -1 / s, 3 / s]))


def _gae_loop(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = int(mask[b].sum())  # right padding: real tokens are 0..n-1
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b][t] = last
    adv = torch.tensor(adv)
    return adv, (adv + values) * mask


def test_gae_equals_plain_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 7
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = [7, 3, 1, 5]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)]:
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        ref_adv, ref_ret = _gae_loop(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, ref_adv)
        torch.testing.assert_close(ret, ref_ret)
        assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_hand_example():
    """T=2, gamma=1, lam=1, reward only at the end: r=[0, 1], V=[0.5, 0.2].
    delta_1 = 1 + 0 - 0.2 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3; A_0 = -0.3 + 0.8 = 0.5;
    returns = A + V = [1, 1] (the Monte-Carlo return)."""
    adv, ret = gae(
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[0.5, 0.2]]),
        torch.ones(1, 2),
        gamma=1.0,
        lam=1.0,
    )
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    w = whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-4, rtol=0)
    w = whiten(x[:3], shift_mean=False)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 3.0]), atol=1e-4, rtol=0)
