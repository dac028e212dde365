"""sft_step_loss computes logits only from the first labelled column: same loss as all columns."""

from __future__ import annotations

import torch

from posttrain.algos.sft import sft_loss, sft_step_loss
from posttrain.data import IGNORE_INDEX


def test_trimmed_logits_give_the_full_loss(tiny):
    model, _ = tiny
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (3, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX  # prompts of different lengths
    labels[1, :8] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX  # right padding
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with torch.no_grad():
        full = sft_loss(model(input_ids=ids, attention_mask=mask).logits, labels)[0]
        trimmed = sft_step_loss(model, batch, None)[0]
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
