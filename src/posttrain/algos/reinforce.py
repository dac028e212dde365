"""REINFORCE with a baseline and a KL penalty (Williams 1992; KL penalty as in Ziegler et al. 2019).

Each step samples completions for a batch of prompts, scores them with the configured reward, and
takes one gradient step on

    loss = mean_i [ -(r_i - b) * sum_t log pi(y_it | x_i, y_i<t) ]          (completion tokens only)

with a baseline b (none, the batch mean, or a moving average of past batches). A KL penalty to a
reference policy with coefficient alpha (`kl_coef`) goes either into the reward (Ziegler style,
r_i <- r_i - alpha * sum_t k(logp, ref_logp), no gradient through it) or into the loss
(+ alpha * sum_t k(logp, ref_logp), differentiated), with the estimator k named: k1 = log pi/ref,
k3 = ref/pi - log(ref/pi) - 1. Note: k1 in the *loss* has zero expected gradient (its gradient is a
score function); use k1 in the reward or k3 in the loss.

Departures from the textbook: log-probs are of the tempered policy (logits / gen.temperature), the
distribution the samples came from; the moving-average baseline of step t uses steps < t only;
dropout is off for the whole run (the policy stays in eval mode, as in PPO), so the sampler, the
scoring pass and the training forward are one function (lora.dropout has no effect here).

Tools (`[tools]`, `--tools.names calculator`): the policy may call them while it samples; the
tokens a tool inserts are attended to but are not the policy's actions, so they get no log-prob,
no loss and no KL, and count in no length (`Rollout.policy_mask` is the mask everywhere below).

    posttrain reinforce --config configs/reinforce_sentiment.toml
    posttrain reinforce --task.name=sentiment --kl_coef=0.05 --lora.enabled=true
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from posttrain.advantages import MovingAverageBaseline, batch_mean_baseline
from posttrain.config import check
from posttrain.forwards import completion_logits_shared
from posttrain.online import gather_rows, sampler_weighted, score_rollout, take
from posttrain.online_run import (
    OnlineConfig,
    OnlineRun,
    rollout_metrics,
    sample_records,
    sequence_rewards,
)
from posttrain.ops import (
    KL_ESTIMATORS,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    selective_log_softmax,
)
from posttrain.rollout import Rollout
from posttrain.train import uses_run_settings


@dataclass
class Config(OnlineConfig):
    steps: int = check(200, ">= 1")
    batch_size: int = check(16, ">= 1")
    baseline: Literal["none", "mean", "moving_average"] = "moving_average"
    """b in -(r - b) log p: none, the batch mean, or a moving average of past batch means"""
    baseline_decay: float = check(0.9, "in [0, 1]")
    """moving-average baseline: b <- decay * b + (1 - decay) * mean reward"""
    kl_in: Literal["reward", "loss"] = "reward"
    """where the penalty goes: subtracted from the reward (no gradient) or added to the loss"""
    exact_kl: bool = False
    """log kl/exact, the KL over the whole vocabulary (costs a policy forward and (B, T, V) softmaxes)"""


def reinforce_loss(
    logp: Tensor,
    mask: Tensor,
    adv: Tensor,
    *,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE loss, the per-sequence sum over completion tokens, averaged over sequences.

    logp, mask, ref_logp: (B, T); adv: (B,) = r - b, treated as a constant, or (B, T) per token
    (importance-weighted by `online.sampler_weighted`: -sum_t m_it adv_it logp_it).
      loss = mean_i [ -adv_i * sum_t m_it logp_it + kl_coef * sum_t m_it k(logp_it, ref_logp_it) ]
    """
    if adv.dim() == 1:
        pg = -adv.detach() * masked_sum(logp, mask, dim=1)  # (B,)
    else:
        pg = -masked_sum(adv.detach() * logp, mask, dim=1)  # (B,)
    metrics = {"loss/policy": pg.mean().detach()}
    loss_seq = pg
    if ref_logp is not None and kl_coef:
        kl = masked_sum(KL_ESTIMATORS[kl_estimator](logp, ref_logp), mask, dim=1)  # (B,)
        loss_seq = loss_seq + kl_coef * kl
        metrics["loss/kl"] = (kl_coef * kl).mean().detach()
    loss = loss_seq.mean()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def micro_batch_loss(
    model: Any, roll: Rollout, idx: Tensor, *, adv: Tensor, ref_logp: Tensor | None,
    loss_mask: Tensor, cfg: Config, temperature: float,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:  # fmt: skip
    """Forward some rollout rows (each prompt once) -> (reinforce_loss, its metrics and the
    token entropy of the policy before the update, the rows' policy mask)."""
    mb = take(roll, idx, adv=adv, ref_logp=ref_logp, loss_mask=loss_mask)
    args = (model, mb.input_ids, mb.attention_mask, mb.T, temperature)
    logits = completion_logits_shared(*args, groups=mb.groups)  # (b, T, V)
    logp = selective_log_softmax(logits, mb.completion_ids)  # (b, T)
    loss, m = reinforce_loss(
        logp, mb.loss_mask, mb.adv, ref_logp=mb.ref_logp,
        kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0, kl_estimator=cfg.kl_estimator,
    )  # fmt: skip
    m["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mb.mask)
    return loss, m, mb.mask


@uses_run_settings
def main(cfg: Config) -> int:
    o = OnlineRun(cfg, "reinforce", n=cfg.samples_per_prompt, ref=cfg.ref, kl_coef=cfg.kl_coef)
    moving = MovingAverageBaseline(cfg.baseline_decay)
    model = o.prepare(o.policy, {"policy": o.policy}, 1, baseline=moving)
    for step in o.steps():
        # 1. rollout and reward; the reference's pass. old_logp is the sampler's (one update per
        # rollout: on policy), unless the exact KL is asked for, which needs the policy's logits
        roll, out, t_gen = o.sample(cfg.batch_size)
        t1 = time.perf_counter()
        scores = score_rollout(
            model, o.ref, roll, temperature=o.gen.temperature, n_micro=cfg.optim.grad_accum,
            on_policy=not (cfg.exact_kl and o.ref is not None), exact=cfg.exact_kl,
            sampler_weight_cap=o.gen.sampler_weight_cap,
        )  # fmt: skip
        t2 = time.perf_counter()
        # 2. advantages: (penalised) reward minus baseline, 0 for skipped samples
        mask = roll.policy_mask  # (B, T) the sampled tokens (tool results left out)
        rewards, valid = sequence_rewards(
            out, scores, mask, kl_coef=cfg.kl_coef, estimator=cfg.kl_estimator,
            in_reward=cfg.kl_in == "reward",
        )  # fmt: skip
        # the batch's mean over every process's samples, as on one process
        all_rewards, all_valid = gather_rows(o.acc, rewards), gather_rows(o.acc, valid)
        if cfg.baseline == "mean":
            b = batch_mean_baseline(all_rewards, all_valid)
        elif cfg.baseline == "moving_average":
            b = moving(all_rewards, all_valid)
        else:
            b = torch.zeros(())
        adv = (rewards - b) * valid  # (B,)
        loss_mask = mask * valid[:, None]

        # 3. one optimizer step over grad_accum micro-batches
        loss_fn = functools.partial(
            micro_batch_loss, model, roll, adv=sampler_weighted(adv, scores),
            ref_logp=scores.ref_logp, loss_mask=loss_mask, cfg=cfg, temperature=o.gen.temperature,
        )  # fmt: skip
        totals = o.update(
            model, loss_fn, loss_mask, epochs=1, minibatches=lambda order: [order],
            reduction="seq_mean", shuffle=False,
        )  # fmt: skip
        # 4. one flat record
        rec = {
            **rollout_metrics(roll, out, scores, o.reward_fn),
            "reward/penalized": float(rewards[valid].mean()) if valid.any() else 0.0,
            "baseline": float(b),
            **totals,
            "kl_coef": cfg.kl_coef,
            "time/generate": t_gen,
            "time/score": t2 - t1,
            "time/train": time.perf_counter() - t2,
        }
        o.end_step(step, rec, sample_records(roll, out, adv, cfg.n_samples))
    return o.finish()
