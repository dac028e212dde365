"""GRPO's fast path (one update per rollout: no scoring forward of the policy, old_logp =
logp.detach(); each prompt run once for its samples) gives the loss and the gradient of the
explicit path (a no-grad forward for old_logp, one full forward per row)."""

from __future__ import annotations

import dataclasses

import torch

from posttrain.algos.grpo import GRPOConfig, micro_batch_loss
from posttrain.online import build_reference, score_rollout
from posttrain.rollout import GenerationConfig, generate


def test_on_policy_shared_prompt_path_equals_explicit_path(tiny):
    model, tok = tiny
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, n=3)
    roll = generate(model, tok, ["Convert 3 feet to inches.", "hello world"], gen, seeds=[1, 2])
    ref = build_reference("copy", model, 0.04)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.3, 0.7, -1.0])
    rows = torch.arange(len(roll))
    out = {}
    for name, fast in [("explicit", False), ("fast", True)]:
        cfg = dataclasses.replace(GRPOConfig(), share_prompts=fast, kl_coef=0.04)
        scores = score_rollout(
            model, ref, roll, temperature=1.0, n_micro=1, on_policy=fast, share_prompts=fast
        )
        model.zero_grad()
        loss, m, _ = micro_batch_loss(
            model, roll, rows, adv=adv, scores=scores, loss_mask=roll.completion_mask, cfg=cfg,
            temperature=1.0, normaliser=8.0, on_policy=fast,
        )  # fmt: skip
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        out[name] = (loss.detach(), m, grads, scores)
    (l0, m0, g0, s0), (l1, m1, g1, s1) = out["explicit"], out["fast"]
    assert m1["ratio"] == 1.0 and float(m0["ratio"]) == 1.0  # on-policy either way
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(m1["loss/kl"], m0["loss/kl"], atol=1e-7, rtol=1e-4)
    # the fast path measures the entropy in the training forward: the scoring pass's value
    mask = roll.completion_mask
    torch.testing.assert_close(m1["entropy"], (s0.entropy * mask).sum() / mask.sum())
    # and takes old_logp from the sampler (the same quantity, for the KL-in-reward estimate)
    torch.testing.assert_close(s1.old_logp, s0.old_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1.ref_logp, s0.ref_logp, atol=1e-5, rtol=1e-5)
    assert s1.kl_exact is None and s0.kl_exact is not None
