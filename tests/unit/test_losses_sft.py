"""SFT and distillation losses against hand-computed values; gradient accumulation invariance."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.distill import distill_loss
from posttrain.algos.sft import sft_loss, sft_step_loss
from posttrain.data import collate_sft
from posttrain.offline import accumulate, supervised

LN2, LN3 = math.log(2), math.log(3)


def _two_token_case() -> tuple[torch.Tensor, torch.Tensor]:
    # V = 2. Position 0 has logits [0, 0]      -> p = (1/2, 1/2), predicts label[1] = 0.
    #        Position 1 has logits [ln 3, 0]   -> p = (3/4, 1/4), predicts label[2] = 1.
    #        Position 2's logits predict nothing (no label after it).
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    return logits, labels


def test_sft_loss_token_mean_by_hand():
    """-ln(1/2) = ln 2 and -ln(1/4) = ln 4 = 2 ln 2; token mean = 3 ln 2 / 2."""
    logits, labels = _two_token_case()
    loss, m = sft_loss(logits, labels)
    assert loss.item() == pytest.approx(1.5 * LN2, abs=1e-6)
    assert m["tokens"].item() == 2
    assert m["nll_sum"].item() == pytest.approx(3 * LN2, abs=1e-6)


def test_sft_loss_masks_prompt_tokens_and_uses_normaliser():
    """Masking label[1] leaves only -ln(1/4) = 2 ln 2; a fixed normaliser 4 divides the sum."""
    logits, labels = _two_token_case()
    masked = labels.clone()
    masked[0, 1] = -100
    loss, m = sft_loss(logits, masked)
    assert loss.item() == pytest.approx(2 * LN2, abs=1e-6)
    assert m["tokens"].item() == 1
    loss4, _ = sft_loss(logits, labels, normaliser=4.0)
    assert loss4.item() == pytest.approx(3 * LN2 / 4, abs=1e-6)


def test_sft_loss_ignores_padding_positions_logits():
    """Changing logits where the label is -100 (and the last position) leaves the loss unchanged."""
    logits, labels = _two_token_case()
    masked = torch.tensor([[-100, -100, 1]])
    other = logits.clone()
    other[0, 0] = torch.tensor([9.0, -9.0])
    other[0, 2] = torch.tensor([-3.0, 3.0])
    assert sft_loss(logits, masked)[0].item() == pytest.approx(sft_loss(other, masked)[0].item())


def _kd_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # One predicted token (position 0 predicts label[1] = 0); V = 2.
    # teacher logits [0, 0] -> p_t = (1/2, 1/2); student logits [ln 3, 0] -> q = (3/4, 1/4).
    student = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0]])
    return student, teacher, labels


def test_distill_loss_t1_forward_by_hand():
    """T = 1, w = 1/2.
    CE = -ln(3/4) = 0.287682.
    KL(t || s) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3) = 0.143841.
    loss = 1/2 * 0.287682 + 1/2 * 1 * 0.143841 = 0.215762."""
    s, t, labels = _kd_case()
    loss, m = distill_loss(s, t, labels, weight=0.5, temperature=1.0, kl="forward")
    assert m["ce"].item() == pytest.approx(-math.log(0.75), abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert loss.item() == pytest.approx(0.215762, abs=1e-5)


def test_distill_loss_t2_forward_by_hand():
    """T = 2, w = 1/2. Student logits / 2 = [ln sqrt3, 0] -> q = (r/(r+1), 1/(r+1)), r = sqrt 3:
    q = (0.633975, 0.366025); the teacher stays (1/2, 1/2).
    KL = 1/2 ln(0.5/0.633975) + 1/2 ln(0.5/0.366025) = 1/2 ln(0.25 / 0.232051) = 0.037252.
    The CE term uses T = 1: -ln(3/4) = 0.287682.
    loss = 1/2 * 0.287682 + 1/2 * 2^2 * 0.037252 = 0.143841 + 0.074505 = 0.218346."""
    s, t, labels = _kd_case()
    loss, m = distill_loss(s, t, labels, weight=0.5, temperature=2.0, kl="forward")
    r = math.sqrt(3)
    q0, q1 = r / (r + 1), 1 / (r + 1)
    kl = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1)
    assert kl == pytest.approx(0.037252, abs=1e-6)
    assert m["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(0.218346, abs=1e-5)


def test_distill_loss_reverse_by_hand():
    """T = 1, w = 1: KL(s || t) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812."""
    s, t, labels = _kd_case()
    loss, m = distill_loss(s, t, labels, weight=1.0, temperature=1.0, kl="reverse")
    assert loss.item() == pytest.approx(0.130812, abs=1e-5)
    assert m["kl"].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)


def test_distill_weight_zero_is_sft_and_identical_models_have_zero_kl():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 0]])
    loss, m = distill_loss(logits, torch.randn(2, 5, 7), labels, weight=0.0, temperature=2.0)
    assert loss.item() == pytest.approx(sft_loss(logits, labels)[0].item(), abs=1e-6)
    _, m = distill_loss(logits, logits.clone(), labels, weight=1.0, temperature=3.0)
    assert m["kl"].item() == pytest.approx(0.0, abs=1e-6)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_accumulation_1x4_equals_4x1(tiny):
    """Four examples of different lengths: one micro-batch of 4 and four micro-batches of 1 give
    the same gradient (the loss is divided by the label tokens of the whole step). Averaging
    per-micro-batch token means instead would differ, which the last assertion checks."""
    from accelerate import Accelerator

    model, tok = tiny
    model.train()
    acc = Accelerator(cpu=True)
    texts = [("a b", " c d e f"), ("hello world what", " is"), ("x", " y z"), ("1 2 3 4", " 5 6 7")]
    from posttrain.data import encode_prompt_completion

    exs = [encode_prompt_completion(tok, p, c, max_length=64) for p, c in texts]
    pad = tok.pad_token_id

    model.zero_grad()
    objective = supervised(acc.device, pad, sft_step_loss)
    m_big = accumulate(acc, model, [collate_sft(exs, pad)], objective)
    g_big = _grads(model)
    model.zero_grad()
    m_small = accumulate(acc, model, [collate_sft([e], pad) for e in exs], objective)
    g_small = _grads(model)
    assert m_big["loss"].item() == pytest.approx(m_small["loss"].item(), rel=1e-5)
    assert m_big["tokens"].item() == m_small["tokens"].item()
    for a, b in zip(g_big, g_small):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # the naive reduction (token mean per micro-batch, averaged) gives a different gradient
    model.zero_grad()
    for e in exs:
        loss, _ = sft_step_loss(model, collate_sft([e], pad), None)
        (loss / len(exs)).backward()
    g_naive = _grads(model)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(g_big, g_naive))
