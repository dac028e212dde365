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
reduced by the named reduction (`ops.aggregate_loss`: token_mean, seq_mean, fixed), for
`inner_epochs` passes over `num_minibatches` minibatches of each rollout batch. With one epoch and
one minibatch the ratio is exactly 1 and the update is REINFORCE with advantage A.

Departures: with several updates per rollout, pi_old is recomputed by a no-grad forward before the
first update (not taken from the sampler), so the ratio starts at 1 to float precision; with one
update per rollout that forward is skipped and pi_old = pi.detach() (the ratio is 1 exactly), the
entropy is measured in the training forward and the exact KL is not logged (`exact_kl=true` brings
back the scoring forward and kl/exact). The samples of one prompt run the prompt through the model
once (`share_prompts`, `ops.completion_logits_shared`). eps_high (DAPO's clip-higher) defaults to
eps; the "fixed" normaliser defaults to gen.max_new_tokens (Dr. GRPO). Dropout is off for the whole
run (the policy stays in eval mode, as in PPO): with dropout on, pi_old and pi would be two draws
of a random function and the first ratio would not be 1 (lora.dropout has no effect here).

Tools (`[tools]`, `--tools.names calculator`): the policy may call them while it samples; the
tokens a tool inserts are attended to but are not the policy's actions, so they get no log-prob,
no ratio, no loss and no KL, and count in no normaliser (`Rollout.policy_mask` is the mask of
every loss and metric; `online.take` returns it as `mask`).

Across processes: each prompt samples from its own seed (run seed, position in the prompt stream)
and token_mean divides by the step's tokens on all processes, so N processes x B prompts train
like one process with N x B prompts (tests/smoke/test_multiprocess.py).

    posttrain grpo --config configs/grpo_unit_conversion.toml
    posttrain rloo --config configs/rloo_sentiment.toml
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posttrain import tasks, train
from posttrain.advantages import group_normalized_advantages, rloo_advantages
from posttrain.config import LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.online import (
    GenOverrides,
    PromptStream,
    accumulation_weight,
    build_reference,
    end_of_step,
    evaluate_policy,
    micro_batches,
    no_sync_unless,
    reduce_mean,
    resolve_generation,
    rollout_batch,
    rollout_metrics,
    sample_records,
    score_rollout,
    step_tokens,
    take,
)
from posttrain.ops import (
    aggregate_loss,
    completion_logits,
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
    steps: int = check(100, ">= 1")
    """rollout batches (each followed by inner_epochs x num_minibatches optimizer steps)"""
    batch_size: int = check(8, ">= 1")
    """prompts per rollout batch (on each process)"""
    group_size: int = check(4, ">= 2")
    """k, completions sampled per prompt"""
    advantage: Literal["rloo", "group_norm"] = "group_norm"
    """rloo: r_i - mean of the others; group_norm: (r_i - group mean) / (group std + eps)"""
    scale_rewards: bool = True
    """group_norm: divide by the group std (false: Dr. GRPO, centring only)"""
    adv_eps: float = check(1e-4, ">= 0")
    """group_norm: eps added to the group std"""
    inner_epochs: int = check(1, ">= 1")
    """passes over each rollout batch (GRPO's mu)"""
    num_minibatches: int = check(1, ">= 1")
    """optimizer steps per pass; each minibatch is split into optim.grad_accum micro-batches"""
    clip_eps: float = check(0.2, ">= 0")
    """ratio clip: [1 - clip_eps, 1 + clip_eps_high]"""
    clip_eps_high: float | None = check(None, ">= 0")
    """upper clip (DAPO clip-higher); unset: clip_eps"""
    kl_coef: float = check(0.04, ">= 0")
    """beta, the KL coefficient (0: no KL, no reference needed)"""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """per-token KL estimator: k1 = log(pi/ref), k3 = ref/pi - log(ref/pi) - 1"""
    kl_in: Literal["loss", "reward"] = "loss"
    """where the KL goes: in the loss (differentiated) or subtracted from the reward"""
    ref: Literal["auto", "copy", "adapter", "none"] = "auto"
    """reference policy: auto (none if kl_coef is 0, adapter under a fresh LoRA adapter, else copy: also from --model.adapter), copy, adapter, none"""
    loss_reduction: Literal["token_mean", "seq_mean", "fixed"] = "seq_mean"
    """token_mean: over all tokens; seq_mean: per sequence, then over sequences; fixed: sum / (rows x fixed_normaliser)"""
    fixed_normaliser: int = check(0, ">= 0")
    """the constant of the fixed reduction (0: gen.max_new_tokens)"""
    eval_limit: int = check(64, ">= 0")
    """validation rows scored at the start and the end (0: no evaluation)"""
    eval_every: int = check(0, ">= 0")
    """also evaluate every this many steps (0: start and end only)"""
    n_samples: int = check(8, ">= 0")
    """rollout rows written to samples.jsonl every run.sample_every steps"""
    exact_kl: bool = False
    """log kl/exact, the KL over the whole vocabulary (costs a policy forward and (B, T, V) softmaxes)"""
    share_prompts: bool = True
    """forward each prompt once for its group_size samples (KV cache shared); false: per row"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenOverrides = field(default_factory=GenOverrides)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)


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
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    reduction: str = "seq_mean",
    normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate with an optional KL term, reduced by name.

    logp, old_logp, mask, ref_logp: (B, T); adv: (B,) per sequence (or (B, T) per token).
      ratio = exp(logp - old_logp)
      loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A) + kl_coef * k(logp, ref_logp)
      loss = aggregate_loss(loss_t, mask, reduction, normaliser)
    """
    adv = adv.detach()
    if adv.dim() == 1:
        adv = adv[:, None]  # (B, 1)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp - old_logp.detach())  # (B, T)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high)
    pg = -torch.min(ratio * adv, clipped * adv)  # (B, T)
    loss_tok = pg
    metrics: dict[str, Tensor] = {}
    if ref_logp is not None and kl_coef:
        kl = KL_ESTIMATORS[kl_estimator](logp, ref_logp.detach())  # (B, T)
        loss_tok = pg + kl_coef * kl
        metrics["loss/kl"] = aggregate_loss(kl_coef * kl, mask, reduction, normaliser).detach()
    loss = aggregate_loss(loss_tok, mask, reduction, normaliser)
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    metrics["loss/policy"] = aggregate_loss(pg, mask, reduction, normaliser).detach()
    metrics["loss/total"] = loss.detach()
    metrics["clip_fraction"] = masked_mean(was_clipped.float(), mask).detach()
    metrics["ratio"] = masked_mean(ratio, mask).detach()
    return loss, metrics


def advantages(rewards: Tensor, valid: Tensor, cfg: Config) -> Tensor:
    """(B,) -> (B,): leave-one-out or group-normalised, 0 for invalid rows."""
    if cfg.advantage == "rloo":
        return rloo_advantages(rewards, cfg.group_size, valid=valid)
    return group_normalized_advantages(
        rewards, cfg.group_size, scale=cfg.scale_rewards, eps=cfg.adv_eps, valid=valid
    )


def micro_batch_loss(
    model: Any,
    roll: Any,
    rows: Tensor,
    adv: Tensor,
    scores: dict[str, Tensor | None],
    loss_mask: Tensor,
    cfg: Config,
    temperature: float,
    normaliser: float,
    *,
    on_policy: bool = False,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Forward some rollout rows and return (clipped loss, its metrics, their loss mask).

    on_policy: one update per rollout, so the policy being updated sampled these rows and
    old_logp = logp.detach() (ratio exactly 1; no scoring forward needed); the token entropy is
    then measured here, from this forward's logits.
    """
    mb = take(
        roll,
        rows,
        adv=adv,
        old_logp=scores["old_logp"],
        ref_logp=scores["ref_logp"],
        loss_mask=loss_mask,
    )
    args = (model, mb["input_ids"], mb["attention_mask"], mb["T"], temperature)
    if cfg.share_prompts:  # rows of one prompt: run the prompt once
        logits = completion_logits_shared(*args, groups=roll.prompt_index[rows.to(adv.device)])
    else:
        logits = completion_logits(*args)  # (b, T, V)
    logp = selective_log_softmax(logits, mb["input_ids"][:, -mb["T"] :])  # (b, T)
    loss, m = clipped_policy_loss(
        logp,
        logp.detach() if on_policy else mb["old_logp"],
        mb["adv"],
        mb["loss_mask"],
        clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high,
        ref_logp=mb["ref_logp"],
        kl_coef=cfg.kl_coef if cfg.kl_in == "loss" else 0.0,
        kl_estimator=cfg.kl_estimator,
        reduction=cfg.loss_reduction,
        normaliser=normaliser,
    )
    if on_policy:
        m["entropy"] = masked_mean(entropy_from_logits(logits.detach()), mb["mask"])
    return loss, m, mb["loss_mask"]


@uses_run_settings
def main(cfg: Config) -> int:
    acc, run = start(cfg, "rloo" if isinstance(cfg, RLOOConfig) else "grpo")
    task = tasks.load_task(cfg.task)
    gen = resolve_generation(task.generation(), cfg.gen, n=cfg.group_size)
    normaliser = cfg.fixed_normaliser or gen.max_new_tokens
    model, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    model.eval()  # dropout off: pi_old (scoring pass) and pi (training forward) agree (issue #16)
    toolbox = Toolbox.from_config(cfg.tools)  # None without tools.names
    # before any resume, so that a "copy" reference holds the initial weights
    ref = build_reference(cfg.ref, model, cfg.kl_coef, adapter=cfg.model.adapter)
    reward_fn = build_reward(cfg.reward, task, acc.device)
    prompts = PromptStream(task.rows("train"), cfg.run.seed, acc.process_index, acc.num_processes)
    eval_rows = task.rows("validation")[: cfg.eval_limit] if cfg.eval_limit else []
    opt = build_optimizer(model, cfg.optim)
    updates_per_step = cfg.inner_epochs * cfg.num_minibatches
    # one update per rollout: no scoring forward of the policy (old_logp = logp.detach())
    on_policy = updates_per_step == 1 and not cfg.exact_kl
    sched = build_scheduler(opt, cfg.optim, cfg.steps * updates_per_step)
    first = 1
    if cfg.run.resume:
        state = run.load_checkpoint({"policy": model}, opt, sched)
        prompts.load_state_dict(state["prompts"])
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
        state = {"prompts": prompts.state_dict(), "reward": reward_fn.state_dict()}
        run.save_checkpoint(step, {"policy": policy}, opt, sched, state)

    if eval_rows and first == 1:
        evaluate(0)
    step = first - 1
    # every forward (sampler, reference, policy) under accelerate's mixed precision, as the
    # prepared policy's own: a frozen reference would otherwise run in fp32 (issue #16)
    with train.StopOnInterrupt() as stop, acc.autocast():
        for step in range(first, cfg.steps + 1):
            # 1. rollout: group_size completions per prompt, rows of a prompt contiguous
            t0 = time.perf_counter()
            # seeds from the prompts' global positions: 2 processes x 2 prompts sample what
            # 1 process x 4 prompts does, and a resumed run what the uninterrupted one did
            rows, seeds = prompts.draw(cfg.batch_size)
            roll = generate(
                policy, tok, [r["prompt"] for r in rows], gen, seeds=seeds, tools=toolbox
            )
            t1 = time.perf_counter()
            out = reward_fn(roll.prompts, roll.completions, rollout_batch(rows, roll))
            scores = score_rollout(
                model,
                ref,
                roll,
                temperature=gen.temperature,
                n_micro=cfg.optim.grad_accum,
                policy=not on_policy,
                exact=cfg.exact_kl,
                share_prompts=cfg.share_prompts,
            )
            t2 = time.perf_counter()
            # 2. advantages from the (optionally KL-penalised) rewards
            mask = roll.policy_mask  # (B, T) the sampled tokens (tool results left out)
            valid = out.valid.to(mask.device)  # (B,)
            rewards = out.total.to(mask.device)  # (B,)
            if ref is not None and cfg.kl_in == "reward":
                kl_tok = KL_ESTIMATORS[cfg.kl_estimator](scores["old_logp"], scores["ref_logp"])
                rewards = rewards - cfg.kl_coef * masked_sum(kl_tok, mask, dim=1)
            adv = advantages(rewards, valid, cfg)  # (B,)
            loss_mask = mask * valid[:, None]

            # 3. inner epochs over shuffled minibatches; each minibatch is one optimizer step
            B = len(roll)
            totals: dict[str, float] = {}
            grad_norms = []
            lr = opt.param_groups[0]["lr"]
            for _ in range(cfg.inner_epochs):
                order = torch.randperm(B) if updates_per_step > 1 else torch.arange(B)
                for mb_rows in micro_batches(B, cfg.num_minibatches, order):
                    mb_tokens = step_tokens(acc, loss_mask[mb_rows.to(mask.device)])
                    chunks = micro_batches(len(mb_rows), cfg.optim.grad_accum, mb_rows)
                    for j, idx in enumerate(chunks):
                        with no_sync_unless(acc, model, last=j == len(chunks) - 1):
                            loss, m, lmask = micro_batch_loss(
                                model,
                                roll,
                                idx,
                                adv,
                                scores,
                                loss_mask,
                                cfg,
                                gen.temperature,
                                normaliser,
                                on_policy=on_policy,
                            )
                            w = accumulation_weight(
                                lmask,
                                cfg.loss_reduction,
                                step_rows=len(mb_rows),
                                step_tokens=mb_tokens,
                            )
                            acc.backward(loss * w)
                        for k, v in m.items():
                            totals[k] = totals.get(k, 0.0) + float(v) * w / updates_per_step
                    grad_norms.append(
                        clip_and_step(acc, model, opt, sched, cfg.optim.max_grad_norm)
                    )
            t3 = time.perf_counter()
            # 4. one flat record
            rec = {
                **rollout_metrics(roll, out, scores, reward_fn),
                "reward/penalized": float(rewards[valid].mean()) if valid.any() else 0.0,
                "adv/abs_mean": float(adv[valid].abs().mean()) if valid.any() else 0.0,
                "frac_zero_std_groups": _zero_std_fraction(out.total, out.valid, cfg.group_size),
                **totals,
                "grad_norm": sum(grad_norms) / len(grad_norms),
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


def _zero_std_fraction(rewards: Tensor, valid: Tensor, k: int) -> float:
    """Fraction of prompts whose k rewards are all equal (no learning signal from them)."""
    r = torch.where(valid, rewards, torch.nan).view(-1, k)
    spread = r.nan_to_num(float("inf")).amin(1) == r.nan_to_num(float("-inf")).amax(1)
    return float(spread.float().mean())
