"""RLOO and GRPO: k samples per prompt, a baseline from the other samples, a clipped ratio.

`posttrain rloo` (Ahmadian et al. 2024, "Back to Basics"): leave-one-out advantages
    A_i = r_i - mean_{j != i} r_j
with the KL penalty in the reward (k1, Ziegler style) and the loss summed over each completion
(`fixed` reduction).
`posttrain grpo` (Shao et al. 2024, DeepSeekMath): group-normalised advantages
    A_i = (r_i - mean_g r) / (std_g r + eps)
with the k3 KL in the loss and the per-sequence token mean (`seq_mean`).

Both optimise the clipped surrogate of PPO, per completion token t of row i:
    ratio_it = pi(y_it) / pi_old(y_it)
    loss_it  = -min(ratio_it * A_i, clip(ratio_it, 1 - eps, 1 + eps_high) * A_i) + beta * k(pi, ref)_it
with eps = `clip_range`, eps_high = `clip_range_high`, beta = `kl_coef`, k = `samples_per_prompt`.
reduced by the named reduction (`ops.aggregate_loss`: token_mean, seq_mean, fixed), for
`update_epochs` passes over `num_minibatches` minibatches of each rollout batch. With one epoch and
one minibatch the ratio is exactly 1 and the update is REINFORCE with advantage A.

Departures: with several updates per rollout, pi_old is recomputed by a no-grad forward before the
first update (not taken from the sampler), so the ratio starts at 1 to float precision; with one
update per rollout that forward is skipped and pi_old = pi.detach() (the ratio is 1 exactly), the
entropy is measured in the training forward and the exact KL is not logged (`exact_kl=true` brings
back the scoring forward and kl/exact). The samples of one prompt run the prompt through the model
once (`share_prompts`, `forwards.completion_logits_shared`). eps_high (DAPO's clip-higher)
defaults to eps; the "fixed" normaliser defaults to gen.max_new_tokens (Dr. GRPO). Dropout is off for the whole
run (the policy stays in eval mode, as in PPO): with dropout on, pi_old and pi would be two draws
of a random function and the first ratio would not be 1 (lora.dropout has no effect here).

Tools (`[tools]`, `--tools.names calculator`): the policy may call them while it samples; the
tokens a tool inserts are attended to but are not the policy's actions, so they get no log-prob,
no ratio, no loss and no KL, and count in no normaliser (`Rollout.policy_mask` is the mask of
every loss and metric; `online.take` returns it as `MicroBatch.mask`).

Across processes: each prompt samples from its own seed (run seed, position in the prompt stream)
and token_mean divides by the step's tokens on all processes, so N processes x B prompts train
like one process with N x B prompts (tests/smoke/test_multiprocess.py).

    posttrain grpo --config configs/grpo_unit_conversion.toml
    posttrain rloo --config configs/rloo_sentiment.toml
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posttrain.advantages import group_normalized_advantages, rloo_advantages
from posttrain.config import check
from posttrain.forwards import completion_logits, completion_logits_shared
from posttrain.online import Scores, micro_batches, sampler_weighted, score_rollout, take
from posttrain.online_run import (
    OnlineConfig,
    OnlineRun,
    rollout_metrics,
    sample_records,
    sequence_rewards,
)
from posttrain.ops import (
    KL_ESTIMATORS,
    Reduction,
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    masked_mean,
    selective_log_softmax,
)
from posttrain.train import uses_run_settings


@dataclass
class Config(OnlineConfig):
    RENAMED: ClassVar[dict[str, Any]] = {
        "group_size": "samples_per_prompt",
        "inner_epochs": "update_epochs",
        "clip_eps": "clip_range",
        "clip_eps_high": "clip_range_high",
    }
    samples_per_prompt: int = check(4, ">= 2")
    """k, completions sampled per prompt (the group)"""
    advantage: Literal["rloo", "group_norm"] = "group_norm"
    """rloo: r_i - mean of the others; group_norm: (r_i - group mean) / (group std + eps)"""
    scale_rewards: bool = True
    """group_norm: divide by the group std (false: Dr. GRPO, centring only)"""
    adv_eps: float = check(1e-4, ">= 0")
    """group_norm: eps added to the group std"""
    update_epochs: int = check(1, ">= 1")
    """passes over each rollout batch (GRPO's mu)"""
    num_minibatches: int = check(1, ">= 1")
    """optimizer steps per pass; each minibatch is split into optim.grad_accum micro-batches"""
    clip_range: float = check(0.2, ">= 0")
    """ratio clip: [1 - clip_range, 1 + clip_range_high]"""
    clip_range_high: float | None = check(None, ">= 0")
    """upper clip (DAPO clip-higher); unset: clip_range"""
    kl_coef: float = check(0.04, ">= 0")
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_in: Literal["loss", "reward"] = "loss"
    """where the KL goes: in the loss (differentiated) or subtracted from the reward"""
    loss_reduction: Literal["token_mean", "seq_mean", "fixed"] = "seq_mean"
    """token_mean: over all tokens; seq_mean: per sequence, then over sequences; fixed: sum / (rows x fixed_normaliser)"""
    fixed_normaliser: int = check(0, ">= 0")
    """the constant of the fixed reduction (0: gen.max_new_tokens)"""
    exact_kl: bool = False
    """log kl/exact, the KL over the whole vocabulary (costs a policy forward and (B, T, V) softmaxes)"""
    share_prompts: bool = True
    """forward each prompt once for its samples_per_prompt samples (KV cache shared); false: per row"""


@dataclass
class GRPOConfig(Config):
    pass


@dataclass
class RLOOConfig(Config):
    advantage: Literal["rloo", "group_norm"] = "rloo"
    kl_coef: float = check(0.05, ">= 0")
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_in: Literal["loss", "reward"] = "reward"
    loss_reduction: Literal["token_mean", "seq_mean", "fixed"] = "fixed"


COMMAND_CONFIGS = {"rloo": RLOOConfig, "grpo": GRPOConfig}


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    reduction: Reduction = "seq_mean",
    normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate (`ops.clipped_surrogate`) plus kl_coef x a KL estimate, reduced by
    name (the reduction is linear, so the two terms reduce separately).

    logp, old_logp, mask, ref_logp: (B, T); adv: (B,) per sequence (or (B, T) per token).
      loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + kl_coef * k(logp, ref_logp)
    with eps = clip_range, eps_high = clip_range_high.
    """
    red = {"reduction": reduction, "normaliser": normaliser}
    pg, metrics = clipped_surrogate(
        logp, old_logp, adv, mask, clip_range=clip_range, clip_range_high=clip_range_high, **red
    )
    loss = pg
    if ref_logp is not None and kl_coef:
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp.detach())  # (B, T)
        kl_loss = aggregate_loss(kl_coef * kl, mask, **red)
        loss = pg + kl_loss
        metrics["loss/kl"] = kl_loss.detach()
    metrics["loss/policy"] = pg.detach()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def advantages(rewards: Tensor, valid: Tensor, cfg: Config) -> Tensor:
    """(B,) -> (B,): leave-one-out or group-normalised, 0 for invalid rows."""
    if cfg.advantage == "rloo":
        return rloo_advantages(rewards, cfg.samples_per_prompt, valid=valid)
    return group_normalized_advantages(
        rewards, cfg.samples_per_prompt, scale=cfg.scale_rewards, eps=cfg.adv_eps, valid=valid
    )


def micro_batch_loss(
    model: Any,
    roll: Any,
    rows: Tensor,
    *,
    adv: Tensor,
    scores: Scores,
    loss_mask: Tensor,
    cfg: Config,
    temperature: float,
    normaliser: float,
    on_policy: bool = False,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Forward some rollout rows and return (clipped loss, its metrics, their loss mask).

    on_policy: one update per rollout, so the policy being updated sampled these rows and
    old_logp = logp.detach() (ratio exactly 1; no scoring forward needed); the token entropy is
    then measured here, from this forward's logits.
    """
    mb = take(
        roll, rows, adv=adv, old_logp=scores.old_logp, ref_logp=scores.ref_logp,
        loss_mask=loss_mask,
    )  # fmt: skip
    args = (model, mb.input_ids, mb.attention_mask, mb.T, temperature)
    if cfg.share_prompts:  # rows of one prompt: run the prompt once
        logits = completion_logits_shared(*args, groups=mb.groups)
    else:
        logits = completion_logits(*args)  # (b, T, V)
    logp = selective_log_softmax(logits, mb.completion_ids)  # (b, T)
    loss, m = clipped_policy_loss(
        logp,
        logp.detach() if on_policy else mb.old_logp,
        mb.adv,
        mb.loss_mask,
        clip_range=cfg.clip_range,
        clip_range_high=cfg.clip_range_high,
        ref_logp=mb.ref_logp,
        kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator,
        reduction=cfg.loss_reduction,
        normaliser=normaliser,
    )
    if on_policy:
        m["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mb.mask)
    return loss, m, mb.loss_mask


@uses_run_settings
def main(cfg: Config) -> int:
    command = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    o = OnlineRun(cfg, command, n=cfg.samples_per_prompt, ref=cfg.ref, kl_coef=cfg.kl_coef)
    normaliser = cfg.fixed_normaliser or o.gen.max_new_tokens
    updates_per_step = cfg.update_epochs * cfg.num_minibatches
    # one update per rollout: no scoring forward of the policy (old_logp = logp.detach())
    on_policy = updates_per_step == 1 and not cfg.exact_kl
    model = o.prepare(o.policy, {"policy": o.policy}, updates_per_step)
    for step in o.steps():
        # 1. rollout: samples_per_prompt completions per prompt, rows of a prompt contiguous
        roll, out, t_gen = o.sample(cfg.batch_size)
        t1 = time.perf_counter()
        scores = score_rollout(
            model, o.ref, roll, temperature=o.gen.temperature, n_micro=cfg.optim.grad_accum,
            on_policy=on_policy, exact=cfg.exact_kl, share_prompts=cfg.share_prompts,
            sampler_weight_cap=o.gen.sampler_weight_cap,
        )  # fmt: skip
        t2 = time.perf_counter()
        # 2. advantages from the (optionally KL-penalised) rewards
        mask = roll.policy_mask  # (B, T) the sampled tokens (tool results left out)
        rewards, valid = sequence_rewards(
            out, scores, mask, kl_coef=cfg.kl_coef, estimator=cfg.kl_estimator,
            in_reward=cfg.kl_in == "reward",
        )  # fmt: skip
        adv = advantages(rewards, valid, cfg)  # (B,)
        loss_mask = mask * valid[:, None]
        # 3. update epochs over shuffled minibatches; each minibatch is one optimizer step
        loss_fn = functools.partial(
            micro_batch_loss, model, roll, adv=sampler_weighted(adv, scores), scores=scores,
            loss_mask=loss_mask, cfg=cfg, temperature=o.gen.temperature, normaliser=normaliser, on_policy=on_policy,
        )  # fmt: skip
        totals = o.update(
            model, loss_fn, loss_mask, epochs=cfg.update_epochs,
            minibatches=lambda order: micro_batches(len(order), cfg.num_minibatches, order),
            reduction=cfg.loss_reduction, shuffle=updates_per_step > 1,
        )  # fmt: skip
        # 4. one flat record
        rec = {
            **rollout_metrics(roll, out, scores, o.reward_fn),
            "reward/penalized": float(rewards[valid].mean()) if valid.any() else 0.0,
            "adv/abs_mean": float(adv[valid].abs().mean()) if valid.any() else 0.0,
            "frac_zero_std_groups": _zero_std_fraction(
                out.total, out.valid, cfg.samples_per_prompt
            ),
            **totals,
            "kl_coef": cfg.kl_coef,
            "time/generate": t_gen,
            "time/score": t2 - t1,
            "time/train": time.perf_counter() - t2,
        }
        o.end_step(step, rec, sample_records(roll, out, adv, cfg.n_samples))
    return o.finish()


def _zero_std_fraction(rewards: Tensor, valid: Tensor, k: int) -> float:
    """Fraction of prompts whose k rewards are all equal (no learning signal from them)."""
    r = torch.where(valid, rewards, torch.nan).view(-1, k)
    spread = r.nan_to_num(float("inf")).amin(1) == r.nan_to_num(float("-inf")).amax(1)
    return float(spread.float().mean())
