"""PPO with a value head, GAE and an adaptive KL controller (Ziegler et al. 2019).

Fine-Tuning Language Models from Human Preferences (Ziegler et al. 2019), on top of PPO (Schulman
et al. 2017) and GAE (Schulman et al. 2016). Each step:

  1. sample one completion per prompt from the policy (`rollout.generate`);
  2. score it: the reward at the last completion token, minus beta * KL(policy || reference) at
     every token (`per_token_rewards`), the KL from the k1 (or k3) estimator on the sampled tokens;
  3. values from a scalar head on the policy's last hidden states (or a separate critic), GAE
     advantages and returns (`advantages.gae`), advantages whitened over the batch;
  4. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss (`policy_loss`), clipped
     value loss (`value_loss`) times vf_coef, entropy bonus (`entropy_loss`) times ent_coef;
  5. adapt beta towards a target KL (`AdaptiveKLController`) or keep it fixed.

Departures from the paper: no reward-model training here (the reward is any `[reward]` source:
ROUGE, a classifier, a Python function); rewards are standardised by running statistics
(`reward.normalize`) or per batch (`whiten_rewards`) rather than once before training; dropout is
off during the update (the model stays in eval mode), so on-policy ratios are exactly 1.

    posttrain ppo --config configs/ppo_summarization.toml --run.threads=1
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from posttrain.advantages import gae, whiten
from posttrain.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig
from posttrain.ops import (
    Reduction,
    aggregate_loss,
    completion_logits,
    entropy_from_logits,
    exact_kl,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_var,
    selective_log_softmax,
)
from posttrain.rewards import RewardConfig
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import TaskConfig


def _ppo_task() -> TaskConfig:
    return TaskConfig(name="summarization")


@dataclass
class KLConfig:
    coef: float = 0.2
    """initial KL coefficient beta in the per-token reward (0: no reference model and no KL)"""
    controller: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: move beta towards the target KL (Ziegler et al. 2019); fixed: keep beta"""
    target: float = 6.0
    """adaptive: target KL per completion in nats (summed over its tokens)"""
    horizon: int = 10000
    """adaptive: horizon in samples; beta changes by at most 20% per `horizon` samples"""
    estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward: k1 = logp - ref_logp (Ziegler), k3 = Schulman's"""
    reference: Literal["auto", "copy", "adapter"] = "auto"
    """reference policy: copy (a frozen copy), adapter (the policy with its LoRA adapter off), auto (adapter under LoRA, else copy)"""
    exact: bool = True
    """also log the exact KL over the vocabulary (kl/exact)"""


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {"model": "model.name", "task-name": "task.name"}
    steps: int = 50
    """PPO steps (one rollout batch, then ppo_epochs over it, per step)"""
    batch_size: int = 8
    """prompts per step (rows = batch_size * gen.n)"""
    mini_batch_size: int = 4
    """rows per optimizer step inside the PPO epochs"""
    ppo_epochs: int = 4
    """passes over each rollout batch"""
    gamma: float = 1.0
    """discount factor (1: undiscounted, as in Ziegler et al.)"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip epsilon"""
    cliprange_value: float = 0.2
    """value clip: new values stay within this distance of the rollout's values"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus (the loss adds -ent_coef * entropy)"""
    whiten_advantages: bool = True
    """standardise advantages over the batch's completion tokens"""
    whiten_rewards: bool = False
    """standardise the sequence rewards over the batch before the KL penalty is added"""
    loss_reduction: Reduction = "token_mean"
    """how per-token losses become a scalar: token_mean, seq_mean or fixed"""
    critic: Literal["head", "separate"] = "head"
    """value function: a head on the policy's trunk, or a separate copy of the model with its own head"""
    value_head: str | None = None
    """start from the value_head.safetensors in this directory (a PPO output) instead of a zero head"""
    forward_batch_size: int = 16
    """rows per no-grad forward pass when scoring the rollout (bounds memory)"""
    kl: KLConfig = field(default_factory=KLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.41e-5))
    task: TaskConfig = field(default_factory=_ppo_task)
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    """generation; fields set here override the task's defaults"""
    reward: RewardConfig = field(default_factory=RewardConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        rows = self.batch_size * self.gen.n
        if self.steps < 1 or self.batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("steps, batch_size and ppo_epochs must be at least 1")
        if not 1 <= self.mini_batch_size <= rows:
            raise ConfigError(
                f"mini_batch_size={self.mini_batch_size} must be between 1 and the rollout rows "
                f"batch_size * gen.n = {rows}"
            )
        if self.mini_batch_size % self.optim.grad_accum:
            raise ConfigError(
                f"optim.grad_accum={self.optim.grad_accum} must divide mini_batch_size="
                f"{self.mini_batch_size} (each mini-batch is split into grad_accum micro-batches)"
            )
        if self.gen.temperature <= 0:
            raise ConfigError("PPO samples its rollouts: set gen.temperature > 0 (e.g. 1.0)")
        if self.kl.coef < 0 or self.kl.target <= 0 or self.kl.horizon < 1:
            raise ConfigError("kl.coef must be >= 0, kl.target > 0 and kl.horizon >= 1")


# ---------------------------------------------------------------------------------------------
# Losses (pure)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    reduction: Reduction = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise. All inputs (B, T).

    ratio = exp(logp - old_logp)
    loss_t = max(-adv * ratio, -adv * clip(ratio, 1 - eps, 1 + eps))
    Metrics: clipfrac (share of tokens where the clipped term is the larger one, so its gradient
    is zero), approx_kl (k3 estimate of KL(old || new): mean of (ratio - 1) - log ratio).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, reduction)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
    reduction: Reduction = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss. All inputs (B, T).

    v_clip = old_values + clip(values - old_values, -c, c)
    loss_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
    Metrics: vf_clipfrac (share of tokens where the clipped error is the larger one).
    """
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clip = (v_clip - returns) ** 2
    loss = aggregate_loss(0.5 * torch.maximum(err, err_clip), mask, reduction)
    return loss, {"vf_clipfrac": masked_mean((err_clip > err).float(), mask).detach()}


def entropy_loss(
    entropy: torch.Tensor, mask: torch.Tensor, *, reduction: Reduction = "token_mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The entropy bonus as a loss: -entropy, reduced. entropy (B, T) from `entropy_from_logits`."""
    loss = aggregate_loss(-entropy, mask, reduction)
    return loss, {"entropy": masked_mean(entropy, mask).detach()}


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Ziegler-style rewards (B, T): -beta * kl_t at every completion token, plus the sequence
    score (B,) at its last token. kl and mask (B, T), completions right-padded."""
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    has_tokens = (mask.sum(1) > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last[:, None], (scores * has_tokens)[:, None])


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 is a perfect critic, 0 is
    no better than predicting the mean, below 0 is worse."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


# ---------------------------------------------------------------------------------------------
# KL controllers


class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2:

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    with KL the batch's mean KL per completion and n_steps the samples in the batch.
    """

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """beta stays at its initial value."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_controller(cfg: KLConfig) -> AdaptiveKLController | FixedKLController:
    if cfg.controller == "adaptive":
        return AdaptiveKLController(cfg.coef, cfg.target, cfg.horizon)
    return FixedKLController(cfg.coef)


# ---------------------------------------------------------------------------------------------
# Helpers for main


def step_rows(rows: list[dict[str, Any]], step: int, batch_size: int, seed: int) -> list[dict]:
    """The prompts of step `step` (1-based): a fresh seeded shuffle of the rows per epoch, so the
    order is a function of the step alone and a resumed run sees the same prompts."""
    n, out = len(rows), []
    for k in range((step - 1) * batch_size, step * batch_size):
        perm = np.random.default_rng([seed, k // n]).permutation(n)
        out.append(rows[int(perm[k % n])])
    return out


def merged_generation(task_gen: GenerationConfig, user: GenerationConfig) -> GenerationConfig:
    """The task's generation defaults, with every field the user changed from the defaults."""
    default = GenerationConfig()
    changed = {
        f.name: getattr(user, f.name)
        for f in fields(GenerationConfig)
        if getattr(user, f.name) != getattr(default, f.name)
    }
    return GenerationConfig(**{**task_gen.__dict__, **changed})


def trim(ro: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, slice]:
    """Rows `idx` of a rollout without columns that are padding in every one of them:
    -> input_ids, attention_mask (b, P' + T'), and the slice of the T completion columns kept."""
    p_mask, c_mask = ro.prompt_mask[idx], ro.completion_mask[idx]
    first = int(p_mask.any(0).long().argmax())  # first prompt column with a real token
    T = int(c_mask.sum(1).max().clamp(min=1))
    ids = torch.cat([ro.prompt_ids[idx, first:], ro.completion_ids[idx, :T]], dim=1)
    attn = torch.cat([p_mask[:, first:], c_mask[:, :T].to(p_mask.dtype)], dim=1)
    return ids, attn, slice(0, T)


@torch.no_grad()
def score_rollout(
    ac: Any, ref: Reference | None, ro: Any, *, temperature: float, batch_size: int, exact: bool
) -> dict[str, torch.Tensor]:
    """No-grad passes over the rollout: old_logp, values, entropy and, with a reference, ref_logp
    and the exact per-token KL over the vocabulary. Every tensor (B, T), zero on padding."""
    from posttrain.models import adapter_disabled

    B, T = ro.completion_ids.shape
    keys = ["old_logp", "values", "entropy"] + (["ref_logp", "exact_kl"] if ref else [])
    out = {k: torch.zeros(B, T, device=ro.completion_ids.device) for k in keys}
    for idx in torch.arange(B, device=ro.completion_ids.device).split(batch_size):
        ids, attn, cols = trim(ro, idx)
        n = cols.stop
        logits, values = ac(ids, attn, n, temperature)  # (b, n, V), (b, n)
        out["old_logp"][idx, cols] = selective_log_softmax(logits, ids[:, -n:])
        out["values"][idx, cols] = values.float()
        out["entropy"][idx, cols] = entropy_from_logits(logits)
        if ref is not None:
            with adapter_disabled(ref.model) if ref.disable_adapter else nullcontext():
                ref_logits = completion_logits(ref.model, ids, attn, n, temperature)
            out["ref_logp"][idx, cols] = selective_log_softmax(ref_logits, ids[:, -n:])
            if exact:
                out["exact_kl"][idx, cols] = exact_kl(logits, ref_logits)
    mask = ro.completion_mask.float()
    return {k: v * mask for k, v in out.items()}


@dataclass
class Reference:
    """The reference policy: `model`, run with its LoRA adapter switched off if `disable_adapter`."""

    model: Any
    disable_adapter: bool


def build_reference(policy: Any, cfg: KLConfig) -> Reference | None:
    """None when beta is 0; the policy itself with its adapter off; or a frozen copy."""
    from posttrain.models import frozen_copy, is_peft

    if cfg.coef == 0:
        return None
    kind = cfg.reference
    if kind == "auto":
        kind = "adapter" if is_peft(policy) else "copy"
    if kind == "adapter":
        if not is_peft(policy):
            raise ConfigError(
                "kl.reference=adapter needs a LoRA policy (lora.enabled=true); use kl.reference=copy"
            )
        return Reference(policy, disable_adapter=True)
    return Reference(frozen_copy(policy), disable_adapter=False)


def save_final(run: Any, policy: Any, head: Any, tok: Any, critic: Any = None) -> None:
    """run/final/: the policy (adapter or full weights), tokenizer, value_head.safetensors."""
    from posttrain.value_head import save_value_head

    if not run.is_main:
        return
    out = run.path / "final"
    policy.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    save_value_head(head, out)
    if critic is not None:
        critic.save_pretrained(str(out / "critic"))


def _mean(xs: list[torch.Tensor]) -> float:
    return float(torch.stack(xs).mean()) if xs else float("nan")


# ---------------------------------------------------------------------------------------------
# Training loop


def main(cfg: Config) -> dict[str, Any]:
    from posttrain.rewards import build_reward
    from posttrain.rollout import generate
    from posttrain.tasks import columns, load_task
    from posttrain.train import (
        StopOnInterrupt,
        build_optimizer,
        build_scheduler,
        clip_and_step,
        load_policy,
        start,
    )
    from posttrain.value_head import ActorCritic, ValueHead, hidden_size, load_value_head

    acc, run = start(cfg, "ppo")
    task = load_task(cfg.task)
    rows = task.rows("train")
    gen = merged_generation(task.generation(), cfg.gen)
    policy, tok = load_policy(cfg.model, cfg.lora, acc.device)
    critic = load_policy(cfg.model, cfg.lora, acc.device)[0] if cfg.critic == "separate" else None
    head = load_value_head(cfg.value_head) if cfg.value_head else ValueHead(hidden_size(policy))
    ac = ActorCritic(policy, head.to(acc.device), critic)
    ac.eval()  # dropout off: the ratio on a freshly sampled batch is exactly 1
    ref = build_reference(policy, cfg.kl)
    reward_fn = build_reward(cfg.reward, task, acc.device)
    B = cfg.batch_size * gen.n  # rollout rows per step
    updates_per_step = cfg.ppo_epochs * math.ceil(B / cfg.mini_batch_size)
    opt = build_optimizer(ac, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, cfg.steps * updates_per_step)
    ac, opt = acc.prepare(ac, opt)
    kl_ctl = kl_controller(cfg.kl)
    modules = {"policy": policy, "value_head": head} | ({"critic": critic} if critic else {})
    first = 1
    if cfg.run.resume:
        state = run.load_checkpoint(modules, opt, sched)
        kl_ctl.load_state_dict(state["kl_ctl"])
        reward_fn.load_state_dict(state["reward"])
        first = state["step"] + 1
    micro = cfg.mini_batch_size // cfg.optim.grad_accum
    kl_fn = kl_k1 if cfg.kl.estimator == "k1" else kl_k3
    rec: dict[str, Any] = {}
    with StopOnInterrupt() as stop:
        for step in range(first, cfg.steps + 1):
            # 1. rollout
            t0 = time.perf_counter()
            batch_rows = step_rows(rows, step, cfg.batch_size, cfg.run.seed)
            ro = generate(policy, tok, [r["prompt"] for r in batch_rows], gen)
            t1 = time.perf_counter()

            # 2. rewards: the score at the last token, -beta * KL at every token
            batch = columns([batch_rows[i] for i in ro.prompt_index.tolist()])
            out = reward_fn(ro.prompts, ro.completions, batch)
            t2 = time.perf_counter()
            valid = out.valid.to(acc.device)
            mask = ro.completion_mask.float() * valid[:, None]  # (B, T), invalid rows left out
            scores = whiten(out.total, valid.float()) if cfg.whiten_rewards else out.total
            s = score_rollout(
                ac,
                ref,
                ro,
                temperature=gen.temperature,
                batch_size=cfg.forward_batch_size,
                exact=cfg.kl.exact,
            )  # old_logp, values, entropy, ref_logp, exact_kl: (B, T)
            kl = kl_fn(s["old_logp"], s["ref_logp"]) * mask if ref else torch.zeros_like(mask)
            rewards = per_token_rewards(scores.to(mask), kl, mask, beta=kl_ctl.value)  # (B, T)

            # 3. advantages and returns
            adv, returns = gae(rewards, s["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                adv = whiten(adv, mask)
            t3 = time.perf_counter()

            # 4. PPO epochs over shuffled mini-batches (grad_accum micro-batches each)
            stats: dict[str, list[torch.Tensor]] = {}
            grad_norms = []
            for _ in range(cfg.ppo_epochs):
                for mb in torch.randperm(B, device=acc.device).split(cfg.mini_batch_size):
                    for idx in mb.split(micro):
                        ids, attn, cols = trim(ro, idx)
                        logits, values = ac(ids, attn, cols.stop, gen.temperature)
                        logp = selective_log_softmax(logits, ids[:, -cols.stop :])  # (b, T')
                        m = mask[idx, cols]
                        pg, pg_m = policy_loss(
                            logp, s["old_logp"][idx, cols], adv[idx, cols], m,
                            cliprange=cfg.cliprange, reduction=cfg.loss_reduction,
                        )  # fmt: skip
                        vf, vf_m = value_loss(
                            values, s["values"][idx, cols], returns[idx, cols], m,
                            cliprange_value=cfg.cliprange_value, reduction=cfg.loss_reduction,
                        )  # fmt: skip
                        ent, _ = entropy_loss(
                            entropy_from_logits(logits), m, reduction=cfg.loss_reduction
                        )
                        loss = pg + cfg.vf_coef * vf + cfg.ent_coef * ent
                        acc.backward(loss * len(idx) / len(mb))
                        terms = {"loss/policy": pg, "loss/value": vf, "loss/entropy": ent}
                        terms |= {"loss/total": loss} | {
                            f"ppo/{k}": v for k, v in (pg_m | vf_m).items()
                        }
                        for k, v in terms.items():
                            stats.setdefault(k, []).append(v.detach())
                    grad_norms.append(clip_and_step(acc, ac, opt, sched, cfg.optim.max_grad_norm))
            t4 = time.perf_counter()

            # 5. KL controller, logs, samples, checkpoint
            seq_kl = float(kl.sum(1).mean())  # KL per completion (nats), as the controller sees it
            beta = kl_ctl.value
            kl_ctl.update(seq_kl, B)
            raw = out.raw_total if out.raw_total is not None else out.total
            rec = {
                "reward/mean": float(raw[out.valid].mean()) if out.valid.any() else math.nan,
                "reward/std": float(raw[out.valid].std()) if out.valid.sum() > 1 else 0.0,
                **reward_fn.metrics(out),
                "kl/coef": beta,
                f"kl/{cfg.kl.estimator}": seq_kl,
                "kl/exact": float((s["exact_kl"] * mask).sum(1).mean()) if "exact_kl" in s else math.nan,
                "entropy": float(masked_mean(s["entropy"], mask)),
                "completion/length": float(ro.completion_mask.sum(1).float().mean()),
                **{k: _mean(v) for k, v in stats.items()},
                "value/explained_variance": float(explained_variance(s["values"], returns, mask)),
                "value/mean": float(masked_mean(s["values"], mask)),
                "returns/mean": float(masked_mean(returns, mask)),
                "grad_norm": float(np.mean(grad_norms)),
                "lr": sched.get_last_lr()[0],
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/forward": t3 - t2,
                "time/train": t4 - t3,
            }  # fmt: skip
            if step % cfg.run.log_every == 0 or step == cfg.steps:
                run.log(step, rec)
            if cfg.run.sample_every and step % cfg.run.sample_every == 0:
                comps = out.components.items()
                run.samples(step, [
                    {"prompt": ro.prompts[i], "completion": ro.completions[i],
                     "reward": float(raw[i]), **{f"reward/{k}": float(v[i]) for k, v in comps}}
                    for i in range(min(8, B))
                ])  # fmt: skip
            state = {"kl_ctl": kl_ctl.state_dict(), "reward": reward_fn.state_dict()}
            if (
                step == cfg.steps
                or stop.requested
                or (cfg.run.save_every and step % cfg.run.save_every == 0)
            ):
                run.save_checkpoint(step, modules, opt, sched, state)
            if stop.requested:
                break
    save_final(run, policy, head, tok, critic)
    run.close()
    return rec
