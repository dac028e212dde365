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
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from posttrain import tasks, train
from posttrain.advantages import MovingAverageBaseline, batch_mean_baseline
from posttrain.config import LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.online import (
    GenOverrides,
    PromptStream,
    accumulation_weight,
    build_reference,
    end_of_step,
    evaluate_policy,
    gather_rows,
    micro_batches,
    no_sync_unless,
    reduce_mean,
    resolve_generation,
    rollout_batch,
    rollout_metrics,
    sample_records,
    sampler_scores,
    score_rollout,
    take,
)
from posttrain.ops import (
    completion_logits_shared,
    entropy_from_logits,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_sum,
    selective_log_softmax,
)
from posttrain.rewards import RewardConfig, build_reward
from posttrain.rollout import generate
from posttrain.runs import write_online_format
from posttrain.tasks.base import TaskConfig
from posttrain.tools import Toolbox, ToolConfig
from posttrain.train import (
    build_optimizer,
    build_scheduler,
    clip_and_step,
    load_policy,
    start,
    uses_run_settings,
)

KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "adapter": "model.adapter",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    steps: int = check(200, ">= 1")
    """optimizer steps; each samples a fresh batch"""
    batch_size: int = check(16, ">= 1")
    """prompts per step (on each process)"""
    samples_per_prompt: int = check(1, ">= 1")
    """completions sampled per prompt"""
    baseline: Literal["none", "mean", "moving_average"] = "moving_average"
    """b in -(r - b) log p: none, the batch mean, or a moving average of past batch means"""
    baseline_decay: float = check(0.9, "in [0, 1]")
    """moving-average baseline: b <- decay * b + (1 - decay) * mean reward"""
    kl_coef: float = check(0.0, ">= 0")
    """alpha, the KL penalty coefficient (0: no penalty, no reference needed)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator: k1 = log(pi/ref), k3 = ref/pi - log(ref/pi) - 1"""
    kl_in: Literal["reward", "loss"] = "reward"
    """where the penalty goes: subtracted from the reward (no gradient) or added to the loss"""
    ref: Literal["auto", "copy", "adapter", "none"] = "auto"
    """reference policy: auto (none if kl_coef is 0, adapter under a fresh LoRA adapter, else copy: also from --model.adapter), a frozen copy, the base weights with the LoRA adapter off, none"""
    eval_limit: int = check(64, ">= 0")
    """validation rows scored at the start and the end (0: no evaluation)"""
    eval_every: int = check(0, ">= 0")
    """also evaluate every this many steps (0: start and end only)"""
    n_samples: int = check(8, ">= 0")
    """rollout rows written to samples.jsonl every run.sample_every steps"""
    exact_kl: bool = False
    """log kl/exact, the KL over the whole vocabulary (costs a policy forward and (B, T, V) softmaxes)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenOverrides = field(default_factory=GenOverrides)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)


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

    logp, mask, ref_logp: (B, T); adv: (B,) = r - b, treated as a constant.
      loss = mean_i [ -adv_i * sum_t m_it logp_it + kl_coef * sum_t m_it k(logp_it, ref_logp_it) ]
    """
    seq_logp = masked_sum(logp, mask, dim=1)  # (B,)
    pg = -adv.detach() * seq_logp  # (B,)
    metrics = {"loss/policy": pg.mean().detach()}
    loss_seq = pg
    if ref_logp is not None and kl_coef:
        kl = masked_sum(KL_ESTIMATORS[kl_estimator](logp, ref_logp), mask, dim=1)  # (B,)
        loss_seq = loss_seq + kl_coef * kl
        metrics["loss/kl"] = (kl_coef * kl).mean().detach()
    loss = loss_seq.mean()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


@uses_run_settings
def main(cfg: Config) -> int:
    acc, run = start(cfg, "reinforce")
    task = tasks.load_task(cfg.task)
    gen = resolve_generation(task.generation(), cfg.gen, n=cfg.samples_per_prompt)
    model, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    model.eval()  # dropout off: scoring and training forwards equal the sampler's (issue #16)
    toolbox = Toolbox.from_config(cfg.tools)  # None without tools.names
    # before any resume, so that a "copy" reference holds the initial weights
    ref = build_reference(cfg.ref, model, cfg.kl_coef, adapter=cfg.model.adapter)
    reward_fn = build_reward(cfg.reward, task, acc.device)
    prompts = PromptStream(task.rows("train"), cfg.run.seed, acc.process_index, acc.num_processes)
    eval_rows = task.rows("validation")[: cfg.eval_limit] if cfg.eval_limit else []
    moving = MovingAverageBaseline(cfg.baseline_decay)
    opt = build_optimizer(model, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps)
    first = 1
    if cfg.run.resume:
        state = run.load_checkpoint({"policy": model}, opt, sched)
        prompts.load_state_dict(state["prompts"])
        moving.load_state_dict(state["baseline"])
        reward_fn.load_state_dict(state["reward"])
        first = state["step"] + 1
    model, opt = acc.prepare(model, opt)
    policy = acc.unwrap_model(model)

    def evaluate(step: int) -> None:
        with acc.autocast():  # accelerate's mixed precision, as in training
            metrics, samples = evaluate_policy(
                policy, tok, task, reward_fn, eval_rows, gen, toolbox
            )
        rec = run.log(step, reduce_mean(acc, metrics))
        run.eval_record(step, rec, samples)  # eval_before.json / eval_after.json for the report
        run.samples(step, samples)

    def save(step: int) -> None:
        state = {
            "prompts": prompts.state_dict(),
            "baseline": moving.state_dict(),
            "reward": reward_fn.state_dict(),
        }
        run.save_checkpoint(step, {"policy": policy}, opt, sched, state)

    if eval_rows and first == 1:
        evaluate(0)
    step = first - 1
    # every forward (sampler, reference, policy) under accelerate's mixed precision, as the
    # prepared policy's own: a frozen reference would otherwise run in fp32 (issue #16)
    with train.StopOnInterrupt() as stop, acc.autocast():
        for step in range(first, cfg.steps + 1):
            # 1. rollout and reward
            t0 = time.perf_counter()
            rows, seeds = prompts.draw(cfg.batch_size)  # seeds: one per prompt (PromptStream)
            roll = generate(
                policy, tok, [r["prompt"] for r in rows], gen, seeds=seeds, tools=toolbox
            )
            t1 = time.perf_counter()
            out = reward_fn(roll.prompts, roll.completions, rollout_batch(rows, roll))
            if ref is None:  # nothing needs a forward pass before the update
                scores = sampler_scores(roll)
            else:
                # the reference's pass; old_logp from the sampler (one update per rollout),
                # unless the exact KL is asked for, which needs the policy's logits too
                scores = score_rollout(
                    model,
                    ref,
                    roll,
                    temperature=gen.temperature,
                    n_micro=cfg.optim.grad_accum,
                    policy=cfg.exact_kl,
                    exact=cfg.exact_kl,
                    share_prompts=True,
                )
            t2 = time.perf_counter()
            # 2. advantages: (penalised) reward minus baseline, 0 for skipped samples
            mask = roll.policy_mask  # (B, T) the sampled tokens (tool results left out)
            valid = out.valid.to(mask.device)  # (B,)
            rewards = out.total.to(mask.device)  # (B,)
            if ref is not None and cfg.kl_in == "reward":
                kl_tok = KL_ESTIMATORS[cfg.kl_estimator](scores["old_logp"], scores["ref_logp"])
                rewards = rewards - cfg.kl_coef * masked_sum(kl_tok, mask, dim=1)
            # the batch's mean over every process's samples, as on one process
            all_rewards, all_valid = gather_rows(acc, rewards), gather_rows(acc, valid)
            if cfg.baseline == "mean":
                b = batch_mean_baseline(all_rewards, all_valid)
            elif cfg.baseline == "moving_average":
                b = moving(all_rewards, all_valid)
            else:
                b = torch.zeros(())
            adv = (rewards - b) * valid  # (B,)
            # 3. one optimizer step over grad_accum micro-batches
            loss_mask = mask * valid[:, None]
            totals: dict[str, float] = {}
            n_tok = float(mask.sum())
            chunks = micro_batches(len(roll), cfg.optim.grad_accum)
            for j, idx in enumerate(chunks):
                mb = take(roll, idx, adv=adv, ref_logp=scores["ref_logp"], loss_mask=loss_mask)
                with no_sync_unless(acc, model, last=j == len(chunks) - 1):
                    args = (model, mb["input_ids"], mb["attention_mask"], mb["T"], gen.temperature)
                    # a prompt (and the start all prompts share) runs once
                    groups = roll.prompt_index[idx.to(roll.prompt_index.device)]
                    logits = completion_logits_shared(*args, groups=groups)  # (b, T, V)
                    logp = selective_log_softmax(logits, mb["input_ids"][:, -mb["T"] :])
                    loss, m = reinforce_loss(
                        logp,
                        mb["loss_mask"],
                        mb["adv"],
                        ref_logp=mb["ref_logp"],
                        kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0,
                        kl_estimator=cfg.kl_estimator,
                    )
                    w = accumulation_weight(
                        mb["mask"], "seq_mean", step_rows=len(roll), step_tokens=0
                    )
                    acc.backward(loss * w)
                for k, v in m.items():
                    totals[k] = totals.get(k, 0.0) + float(v) * w
                # token entropy of the policy before the update (this forward's logits)
                ent = masked_mean(entropy_from_logits(logits.detach()), mb["mask"])
                w_tok = float(mb["mask"].sum()) / max(n_tok, 1.0)
                totals["entropy"] = totals.get("entropy", 0.0) + float(ent) * w_tok
            lr = opt.param_groups[0]["lr"]
            grad_norm = clip_and_step(acc, model, opt, sched, cfg.optim.max_grad_norm)
            t3 = time.perf_counter()
            # 4. one flat record
            rec = {
                **rollout_metrics(roll, out, scores, reward_fn),
                "reward/penalized": float(rewards[valid].mean()) if valid.any() else 0.0,
                "baseline": float(b),
                **totals,
                "grad_norm": grad_norm,
                "lr": lr,
                "kl_coef": cfg.kl_coef,
                "epoch": prompts.epoch,
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/train": t3 - t2,
            }
            samples = functools.partial(sample_records, roll, out, adv, cfg.n_samples)
            evaluate_now = evaluate if eval_rows else None
            if end_of_step(
                step, cfg, acc=acc, run=run, rec=rec, samples=samples,
                evaluate=evaluate_now, save=save, stop=stop,
            ):  # fmt: skip
                return 130
    if eval_rows:
        evaluate(step)
    if acc.is_main_process:
        policy.save_pretrained(run.path / "final")
        tok.save_pretrained(run.path / "final")
        write_online_format(run, cfg, gen)  # posttrain.json: task, prompt format, tools
    run.close()
    return 0
