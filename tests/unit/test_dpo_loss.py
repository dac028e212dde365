"""Preference losses (DPO, cDPO, IPO, SimPO, Bradley-Terry) against hand-computed numbers, and the
DPO pieces that touch a model: prompt masking, the reference modes, gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algos.dpo import (
    Config,
    LossType,
    cdpo_loss,
    dpo_loss,
    ipo_loss,
    live_reference,
    micro_batch_loss,
    pair_logps,
    precompute_reference,
    simpo_loss,
)
from posttrain.algos.reward_model import bradley_terry_loss
from posttrain.preferences import PairsConfig, collate_pairs, tokenize_pairs

T = torch.tensor


def _margin_args(h: float) -> tuple[torch.Tensor, ...]:
    """Policy/reference log-probs whose log-ratio difference is h: chosen +h, the rest 0."""
    return T([h]), T([0.0]), T([0.0]), T([0.0])


@pytest.mark.parametrize("h, expected", [(0.0, 0.6931), (10.0, 0.3133), (20.0, 0.1269)])
def test_dpo_loss_hand_values(h, expected):
    """beta = 0.1: loss = -log sigmoid(0.1 h) = log(1 + exp(-0.1 h)).
    h = 0: log 2 = 0.69315; h = 10: log(1 + e^-1) = 0.31326; h = 20: log(1 + e^-2) = 0.12693."""
    loss, _ = dpo_loss(*_margin_args(h), beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-4)


def test_dpo_metrics_hand_values():
    """beta 0.5; chosen logp -5 vs ref -6 -> implicit reward 0.5 * 1 = 0.5; rejected -7 vs ref -6
    -> -0.5. margin 1, accuracy 1, loss log(1 + e^-1) = 0.31326."""
    loss, m = dpo_loss(T([-5.0]), T([-7.0]), T([-6.0]), T([-6.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.31326, abs=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(0.5)
    assert m["rewards/rejected"].item() == pytest.approx(-0.5)
    assert m["rewards/margin"].item() == pytest.approx(1.0)
    assert m["rewards/accuracy"].item() == 1.0
    assert m["logps/chosen"].item() == -5.0 and m["logps/rejected"].item() == -7.0


def test_dpo_loss_is_mean_over_pairs():
    """Two pairs with h = 0 and 10 at beta 0.1: (0.69315 + 0.31326) / 2 = 0.50320."""
    loss, m = dpo_loss(T([0.0, 10.0]), T([0.0, 0.0]), T([0.0, 0.0]), T([0.0, 0.0]), beta=0.1)
    assert loss.item() == pytest.approx(0.50320, abs=1e-5)
    assert m["rewards/accuracy"].item() == 0.5  # the tie is not counted as correct


def test_cdpo_hand_values():
    """eps 0.1, beta 0.1, h 10: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1)
    = 0.9 * 0.31326 + 0.1 * 1.31326 = 0.41326. eps 0 is plain DPO."""
    loss, _ = cdpo_loss(*_margin_args(10.0), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.41326, abs=1e-5)
    plain, _ = cdpo_loss(*_margin_args(10.0), beta=0.1, label_smoothing=0.0)
    assert plain.item() == pytest.approx(dpo_loss(*_margin_args(10.0), beta=0.1)[0].item())


@pytest.mark.parametrize("h, expected", [(0.0, 25.0), (5.0, 0.0), (10.0, 25.0), (3.0, 4.0)])
def test_ipo_hand_values(h, expected):
    """beta 0.1: target 1 / (2 * 0.1) = 5; loss (h - 5)^2: h 0 -> 25, 5 -> 0, 10 -> 25, 3 -> 4."""
    loss, _ = ipo_loss(*_margin_args(h), beta=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_simpo_hand_values():
    """beta 2, gamma 0.5, mean logps -1 (chosen) and -2: z = 2 * 1 - 0.5 = 1.5,
    loss = log(1 + e^-1.5) = 0.20141."""
    loss, m = simpo_loss(T([-1.0]), T([-2.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.20141, abs=1e-5)
    assert m["rewards/chosen"].item() == -2.0


def test_loss_type_properties():
    assert LossType.DPO.needs_reference and LossType.IPO.needs_reference
    assert not LossType.SIMPO.needs_reference
    assert LossType.IPO.length_normalized and LossType.SIMPO.length_normalized
    assert not LossType.DPO.length_normalized and not LossType.CDPO.length_normalized


def test_bradley_terry_worked_examples():
    """Scores chosen [2, 0, 1], rejected [0, 0, 3]: gaps 2, 0, -2.
    loss = mean(log(1+e^-2), log 2, log(1+e^2)) = (0.12693 + 0.69315 + 2.12693) / 3 = 0.98233;
    accuracy 1/3 (the tie is wrong); mean margin 0."""
    loss, m = bradley_terry_loss(T([2.0, 0.0, 1.0]), T([0.0, 0.0, 3.0]))
    assert loss.item() == pytest.approx(0.98234, abs=1e-4)
    assert m["accuracy"].item() == pytest.approx(1 / 3)
    assert m["margin"].item() == pytest.approx(0.0)


def test_bradley_terry_margin():
    """margin 1, gap 2: log(1 + e^-1) = 0.31326; gap 0: log(1 + e^1) = 1.31326."""
    assert bradley_terry_loss(T([2.0]), T([0.0]), margin=1.0)[0].item() == pytest.approx(
        0.31326, abs=1e-5
    )
    assert bradley_terry_loss(T([0.0]), T([0.0]), margin=1.0)[0].item() == pytest.approx(
        1.31326, abs=1e-5
    )


# ---------------------------------------------------------------------------------------------
# With the tiny model

RECORDS = [
    {"prompt": "The movie was", "chosen": " great fun", "rejected": " terrible"},
    {
        "prompt": "This film is a wonderful",
        "chosen": " story",
        "rejected": " bad ending and boring",
    },
    {"prompt": "Summary:", "chosen": " the council voted", "rejected": " boring"},
    {"prompt": "hello world what is", "chosen": " Paris.", "rejected": " the capital"},
]


def _items(tok):
    return tokenize_pairs(tok, RECORDS, PairsConfig())[0]


def test_prompt_tokens_are_masked(tiny):
    """pair_logps equals a plain loop: each row alone, unpadded, summing log-probs of the completion
    tokens only (prompt tokens contribute nothing)."""
    model, tok = tiny
    items = _items(tok)
    batch = collate_pairs(items, tok.pad_token_id)
    got = pair_logps(model, batch)
    want = []
    for key in ("chosen_ids", "rejected_ids"):
        for it in items:
            ids = torch.tensor([it["prompt_ids"] + it[key]])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            tok_logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            want.append(tok_logp[len(it["prompt_ids"]) - 1 :].sum())
    assert torch.allclose(got.detach(), torch.stack(want), atol=1e-4)
    # the completion mask covers exactly the completion tokens (EOS included)
    lengths = [len(it["chosen_ids"]) for it in items] + [len(it["rejected_ids"]) for it in items]
    assert batch.mask.sum(1).tolist() == lengths


def test_precomputed_reference_equals_live(tiny):
    model, tok = tiny
    items = _items(tok)
    cached = torch.tensor(precompute_reference(model, items, tok.pad_token_id, batch_size=3))
    live = live_reference(model, collate_pairs(items, tok.pad_token_id), adapter_off=False)
    assert torch.allclose(cached, torch.stack(live.chunk(2), 1), atol=1e-4)


def test_adapter_disabled_reference_equals_base_model(tiny):
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora

    model, tok = tiny
    batch = collate_pairs(_items(tok), tok.pad_token_id)
    with torch.no_grad():
        base = pair_logps(model, batch)
    peft = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # move the adapter away from its identity start
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref = live_reference(peft, batch, adapter_off=True)
    adapted = live_reference(peft, batch, adapter_off=False)
    assert torch.allclose(ref, base, atol=1e-5)
    assert not torch.allclose(adapted, base, atol=1e-2)


def _with_refs(model, tok):
    items = _items(tok)
    for it, ref in zip(items, precompute_reference(model, items, tok.pad_token_id, 4)):
        it["ref"] = ref
    return items


def test_preferred_answer_lowers_loss(tiny):
    """One SGD step on the DPO loss lowers it and raises chosen over rejected (margin > 0)."""
    model, tok = tiny
    items = _with_refs(model, tok)
    cfg = Config(beta=0.1)
    model.train()
    loss0, m0 = micro_batch_loss(cfg, model, items, tok.pad_token_id, None)
    assert loss0.item() == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at start
    loss0.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    loss1, m1 = micro_batch_loss(cfg, model, items, tok.pad_token_id, None)
    assert loss1.item() < loss0.item()
    assert m1["rewards/margin"].item() > 0


@pytest.mark.parametrize("loss_type", [LossType.DPO, LossType.IPO])
def test_grad_accumulation_invariance(tiny, loss_type):
    """Micro-batch 1 x accumulation 4 gives the gradient of one batch of 4 (equal micro-batch
    sizes, each loss / 4), even though padding differs between the two layouts."""
    model, tok = tiny
    items = _with_refs(model, tok)
    cfg = Config(beta=0.1, loss_type=loss_type)
    model.train()
    micro_batch_loss(cfg, model, items, tok.pad_token_id, None)[0].backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for it in items:
        (micro_batch_loss(cfg, model, [it], tok.pad_token_id, None)[0] / 4).backward()
    for g, p in zip(whole, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5, rtol=1e-4)
