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
off during the update (the model stays in eval mode), so on-policy ratios are exactly 1; the
`fixed` loss reduction divides by rows x `fixed_normaliser` (default gen.max_new_tokens), a
constant, so micro-batching does not change the loss.

Tools (`[tools]`, `--tools.names calculator`): the policy may call them while it samples. The
tokens a tool inserts are attended to and seen by the value head, but they are the environment's
answer, not actions: `Rollout.policy_mask` (not the completion mask) is the mask of the policy,
value and entropy losses, the KL penalty, the whitening and every metric, and GAE skips them
(`advantages.gae`: a masked position gets advantage 0 and passes the next action's value and
advantage through unchanged, so gamma and lambda count actions, and the value of the state after
a tool result bootstraps the action that made the call). The score goes on the last sampled token.

    posttrain ppo --config configs/ppo_summarization.toml --run.threads=1
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from posttrain.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.online import GenOverrides, Reference, micro_batches, take
from posttrain.ops import (
    Reduction,
    aggregate_loss,
    entropy_from_logits,
    exact_kl,
    masked_mean,
    masked_var,
    selective_log_softmax,
)
from posttrain.rewards import RewardConfig
from posttrain.rollout import Rollout
from posttrain.tasks.base import TaskConfig
from posttrain.tools import ToolConfig
from posttrain.train import uses_run_settings


def _ppo_task() -> TaskConfig:
    return TaskConfig(name="summarization")


@dataclass
class KLConfig:
    coef: float = check(0.2, ">= 0")
    """initial KL coefficient beta in the per-token reward (0: no KL, no reference model)"""
    controller: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: move beta towards the target KL (Ziegler et al. 2019); fixed: keep beta"""
    target: float = check(6.0, "> 0")
    """adaptive: target KL per completion in nats (summed over its tokens)"""
    horizon: int = check(10000, ">= 1")
    """adaptive: horizon in samples; beta changes by at most 20% per `horizon` samples"""
    estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator in the reward: k1 = logp - ref_logp (Ziegler), k3 = Schulman's"""
    ref: Literal["auto", "copy", "adapter", "none"] = "auto"
    """reference policy: auto (none if coef is 0, adapter under a fresh LoRA adapter, else copy: also from --model.adapter), a frozen copy, the base weights with the LoRA adapter off, none"""


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "adapter": "model.adapter",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    steps: int = check(50, ">= 1")
    """PPO steps: one rollout batch, then ppo_epochs of updates on it"""
    batch_size: int = check(8, ">= 1")
    """prompts per step (on each process)"""
    samples_per_prompt: int = check(1, ">= 1")
    """completions sampled per prompt (rollout rows = batch_size * samples_per_prompt)"""
    mini_batch_size: int = check(4, ">= 1")
    """rollout rows per optimizer step inside the PPO epochs (split into optim.grad_accum micro-batches)"""
    ppo_epochs: int = check(4, ">= 1")
    """passes over each rollout batch, each in a fresh shuffled order"""
    gamma: float = check(1.0, "in [0, 1]")
    """discount factor (1: undiscounted, as in Ziegler et al.)"""
    lam: float = check(0.95, "in [0, 1]")
    """GAE lambda"""
    cliprange: float = check(0.2, ">= 0")
    """policy ratio clip epsilon"""
    cliprange_value: float = check(0.2, ">= 0")
    """value clip: new values stay within this distance of the rollout's values"""
    vf_coef: float = check(0.1, ">= 0")
    """weight of the value loss in the total loss"""
    ent_coef: float = 0.0
    """weight of the entropy bonus (the loss adds -ent_coef * entropy)"""
    whiten_advantages: bool = True
    """standardise advantages over the batch's completion tokens"""
    whiten_rewards: bool = False
    """standardise the sequence rewards over the batch before the KL penalty is added"""
    loss_reduction: Reduction = "token_mean"
    """per-token losses -> scalar: token_mean, seq_mean or fixed (exact under grad_accum)"""
    fixed_normaliser: int = check(0, ">= 0")
    """the constant of the fixed reduction: sum / (rows x fixed_normaliser) (0: gen.max_new_tokens)"""
    critic: Literal["head", "separate"] = "head"
    """value function: a head on the policy's trunk, or a separate copy of the model with its own head"""
    value_head: str | None = None
    """start from the value_head.safetensors in this directory (a PPO output) instead of a zero head"""
    forward_batch_size: int = check(16, ">= 1")
    """rows per no-grad forward pass when scoring the rollout (bounds memory)"""
    eval_limit: int = check(16, ">= 0")
    """validation rows scored at the start and the end (0: no evaluation)"""
    eval_every: int = check(0, ">= 0")
    """also evaluate every this many steps (0: start and end only)"""
    n_samples: int = check(8, ">= 0")
    """rollout rows written to samples.jsonl every run.sample_every steps"""
    kl: KLConfig = field(default_factory=KLConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.41e-5))
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=_ppo_task)
    gen: GenOverrides = field(default_factory=GenOverrides)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)

    def validate(self) -> None:
        rows = self.batch_size * self.samples_per_prompt
        if not 1 <= self.mini_batch_size <= rows:
            raise ConfigError(
                f"mini_batch_size={self.mini_batch_size} must be between 1 and the rollout rows "
                f"batch_size * samples_per_prompt = {rows}"
            )
        if self.optim.grad_accum > self.mini_batch_size:
            raise ConfigError(
                f"optim.grad_accum={self.optim.grad_accum} splits each mini-batch into micro-batches: "
                f"it cannot exceed mini_batch_size={self.mini_batch_size}"
            )


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
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, as a loss to minimise. All inputs (B, T); normaliser: the
    constant of the `fixed` reduction (`ops.aggregate_loss`).

    ratio = exp(logp - old_logp)
    loss_t = max(-adv * ratio, -adv * clip(ratio, 1 - eps, 1 + eps))
    Metrics: clipfrac (share of tokens where the clipped term is the larger one, so its gradient
    is zero), approx_kl (k3 estimate of KL(old || new): mean of (ratio - 1) - log ratio).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, reduction, normaliser)
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
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss. All inputs (B, T).

    v_clip = old_values + clip(values - old_values, -c, c)
    loss_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
    Metrics: vf_clipfrac (share of tokens where the clipped error is the larger one).
    """
    v_clip = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err = (values - returns) ** 2
    err_clip = (v_clip - returns) ** 2
    loss = aggregate_loss(0.5 * torch.maximum(err, err_clip), mask, reduction, normaliser)
    return loss, {"vf_clipfrac": masked_mean((err_clip > err).float(), mask).detach()}


def entropy_loss(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: Reduction = "token_mean",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The entropy bonus as a loss: -entropy, reduced. entropy (B, T) from `entropy_from_logits`."""
    loss = aggregate_loss(-entropy, mask, reduction, normaliser)
    return loss, {"entropy": masked_mean(entropy, mask).detach()}


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """Ziegler-style rewards (B, T): -beta * kl_t at every masked token, plus the sequence score
    (B,) at its last masked token. kl and mask (B, T); the mask may have holes (tool-inserted
    tokens inside a completion: the policy mask), the score goes on the last sampled token."""
    rewards = -beta * kl * mask
    T = mask.shape[1]
    last = (T - 1 - (mask.flip(1) > 0).long().argmax(1)).clamp(min=0)  # (B,) last masked index
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


def drop_left_padding(mb: dict[str, Any]) -> dict[str, Any]:
    """A micro-batch from `online.take` without the prompt columns that are padding in all of its
    rows (prompts are left-padded to the longest of the whole rollout). Positions come from the
    attention mask, so log-probs and values do not change; the forward pass gets shorter."""
    first = int(mb["attention_mask"].any(0).long().argmax())
    return mb | {k: mb[k][:, first:] for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def score_rollout(
    ac: Any,
    ref: Reference | None,
    roll: Rollout,
    *,
    temperature: float,
    n_micro: int,
    policy: bool = True,
) -> dict[str, torch.Tensor | None]:
    """Before any update: old_logp, values, entropy and (with a reference) ref_logp and the exact
    KL over the vocabulary, all (B, T), zero on padding. `online.score_rollout` plus the values.

    policy=False: the reference pass only; old_logp is the sampler's (`rollout.logp`, the same
    quantity) and values, entropy and the exact KL are None (the caller's training forward gives
    values and entropy, when one forward serves the whole update)."""
    B, T = roll.completion_mask.shape
    keys = ("old_logp", "values", "entropy", "kl_exact") if policy else ()
    keys += ("ref_logp",) if ref is not None else ()
    out: dict[str, torch.Tensor | None] = {
        k: torch.zeros(B, T, device=roll.completion_mask.device) for k in keys
    }
    for rows in micro_batches(B, n_micro):
        mb = drop_left_padding(take(roll, rows))
        t, m = mb["T"], mb["mask"]
        ids = mb["input_ids"][:, -t:]
        # a prompt (and the start all prompts share) runs once through each model
        groups = roll.prompt_index[rows.to(roll.prompt_index.device)]
        if policy:
            logits, values = ac(mb["input_ids"], mb["attention_mask"], t, temperature, groups)
            out["old_logp"][rows, :t] = selective_log_softmax(logits, ids) * m
            out["values"][rows, :t] = values.float() * m
            out["entropy"][rows, :t] = entropy_from_logits(logits) * m
        if ref is not None:
            ref_logits = ref.logits(mb["input_ids"], mb["attention_mask"], t, temperature, groups)
            out["ref_logp"][rows, :t] = selective_log_softmax(ref_logits, ids) * m
            if policy:
                out["kl_exact"][rows, :t] = exact_kl(logits, ref_logits) * m
    if not policy:
        out["old_logp"] = roll.logp * roll.policy_mask
    for k in ("values", "entropy", "ref_logp", "kl_exact"):
        out.setdefault(k, None)
    if ref is None:
        out["kl_exact"] = None
    return out


def minibatch_loss(
    ac: Any,
    mb: dict[str, Any],
    cfg: Config,
    temperature: float,
    outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward one micro-batch (from `online.take`) and combine the three losses:
    policy_loss + vf_coef * value_loss + ent_coef * entropy_loss -> (loss, detached metrics).
    normaliser: the `fixed` reduction's constant; pass the run's (`max_new_tokens`), not the
    micro-batch's width, which `take` trims to its longest completion (None: that width).

    outputs: (logits, values) of this micro-batch already computed (with grad), instead of a
    forward here. old_logp / old_values None in mb: on-policy, they are logp / values detached."""
    if outputs is None:
        outputs = ac(mb["input_ids"], mb["attention_mask"], mb["T"], temperature, mb.get("groups"))
    logits, values = outputs
    logp = selective_log_softmax(logits, mb["input_ids"][:, -mb["T"] :])  # (b, T')
    old_logp = logp.detach() if mb["old_logp"] is None else mb["old_logp"]
    old_values = values.detach() if mb["old_values"] is None else mb["old_values"]
    m, red = mb["loss_mask"], {"reduction": cfg.loss_reduction, "normaliser": normaliser}
    pg, pg_m = policy_loss(logp, old_logp, mb["adv"], m, cliprange=cfg.cliprange, **red)
    vf, vf_m = value_loss(values, old_values, mb["returns"], m, cliprange_value=cfg.cliprange_value, **red)  # fmt: skip
    # without an entropy bonus the entropy is only logged: keep it out of the backward graph
    ent_tok = entropy_from_logits(logits if cfg.ent_coef else logits.detach())
    ent, _ = entropy_loss(ent_tok, m, **red)
    loss = pg + cfg.vf_coef * vf + cfg.ent_coef * ent
    metrics = {"loss/policy": pg, "loss/value": vf, "loss/entropy": ent, "loss/total": loss}
    metrics |= {f"ppo/{k}": v for k, v in (pg_m | vf_m).items()}
    return loss, {k: v.detach() for k, v in metrics.items()}


def save_final(
    run: Any, cfg: Config, gen: Any, policy: Any, head: Any, tok: Any, critic: Any = None
) -> None:
    """run/final/: the policy (adapter or full weights), tokenizer, value_head.safetensors,
    posttrain.json (task, prompt format, tools) and, with a separate critic, critic/."""
    from posttrain.runs import write_online_format
    from posttrain.value_head import save_value_head

    if not run.is_main:
        return
    out = run.path / "final"
    policy.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    save_value_head(head, out)
    if critic is not None:
        critic.save_pretrained(str(out / "critic"))
    write_online_format(run, cfg, gen)


# ---------------------------------------------------------------------------------------------
# Training loop


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.advantages import gae
    from posttrain.online import (
        PromptStream,
        accumulation_weight,
        build_reference,
        end_of_step,
        evaluate_policy,
        reduce_mean,
        resolve_generation,
        rollout_batch,
        rollout_metrics,
        sample_records,
        step_tokens,
        whiten_over_processes,
    )
    from posttrain.ops import kl_k1, kl_k3
    from posttrain.rewards import build_reward
    from posttrain.rollout import generate
    from posttrain.tasks import load_task
    from posttrain.tools import Toolbox
    from posttrain.train import (
        StopOnInterrupt,
        build_optimizer,
        build_scheduler,
        clip_and_step,
        load_policy,
        start,
    )
    from posttrain.value_head import (
        ActorCritic,
        ValueHead,
        hidden_size,
        load_value_head,
        prepare_critic,
    )

    acc, run = start(cfg, "ppo")
    task = load_task(cfg.task)
    gen = resolve_generation(task.generation(), cfg.gen, n=cfg.samples_per_prompt)
    normaliser = cfg.fixed_normaliser or gen.max_new_tokens  # `fixed`: a constant (issue #16)
    toolbox = Toolbox.from_config(cfg.tools)  # None without tools.names
    policy, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    critic = None
    if cfg.critic == "separate":
        critic = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)[0]
        critic = prepare_critic(critic)
    head = load_value_head(cfg.value_head) if cfg.value_head else ValueHead(hidden_size(policy))
    ac = ActorCritic(policy, head.to(acc.device), critic)
    ac.eval()  # dropout off: the ratio on a freshly sampled batch is exactly 1
    # before resume: the initial weights
    ref = build_reference(cfg.kl.ref, policy, cfg.kl.coef, adapter=cfg.model.adapter)
    reward_fn = build_reward(cfg.reward, task, acc.device)
    prompts = PromptStream(task.rows("train"), cfg.run.seed, acc.process_index, acc.num_processes)
    eval_rows = task.rows("validation")[: cfg.eval_limit] if cfg.eval_limit else []
    B = cfg.batch_size * cfg.samples_per_prompt  # rollout rows per step (per process)
    opt = build_optimizer(ac, cfg.optim)
    updates_per_step = cfg.ppo_epochs * math.ceil(B / cfg.mini_batch_size)  # optimizer steps
    # one update from one forward per rollout: that forward's values give the advantages and its
    # logits the loss (no scoring forward of the policy; ratio 1 and value clip inactive exactly)
    single = updates_per_step == 1 and cfg.optim.grad_accum == 1
    sched = build_scheduler(opt, cfg.optim, cfg.steps * updates_per_step)
    kl_ctl = kl_controller(cfg.kl)
    kl_fn = kl_k1 if cfg.kl.estimator == "k1" else kl_k3
    modules = {"policy": policy, "value_head": head} | ({"critic": critic} if critic else {})
    first = 1
    if cfg.run.resume:
        state = run.load_checkpoint(modules, opt, sched)
        prompts.load_state_dict(state["prompts"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        reward_fn.load_state_dict(state["reward"])
        first = state["step"] + 1
    ac, opt = acc.prepare(ac, opt)

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
            "kl_ctl": kl_ctl.state_dict(),
            "reward": reward_fn.state_dict(),
        }
        run.save_checkpoint(step, modules, opt, sched, state)

    if eval_rows and first == 1:
        evaluate(0)
    step = first - 1
    # every forward (sampler, reference, policy) under accelerate's mixed precision, as the
    # prepared policy's own: a frozen reference would otherwise run in fp32 (issue #16)
    with StopOnInterrupt() as stop, acc.autocast():
        for step in range(first, cfg.steps + 1):
            # 1. rollout and the task reward
            t0 = time.perf_counter()
            rows, seeds = prompts.draw(cfg.batch_size)  # seeds: one per prompt (PromptStream)
            roll = generate(
                policy, tok, [r["prompt"] for r in rows], gen, seeds=seeds, tools=toolbox
            )
            t1 = time.perf_counter()
            out = reward_fn(roll.prompts, roll.completions, rollout_batch(rows, roll))
            t2 = time.perf_counter()

            # 2. per-token rewards: the score at the last token, -beta * KL at every token
            n_fwd = math.ceil(B / cfg.forward_batch_size)
            s = score_rollout(
                ac, ref, roll, temperature=gen.temperature, n_micro=n_fwd, policy=not single
            )
            if single:  # the training forward, before the advantages that its values give
                whole = drop_left_padding(take(roll, torch.arange(B)))
                groups = roll.prompt_index  # each prompt (and their common start) run once
                outputs = ac(whole["input_ids"], whole["attention_mask"], whole["T"], gen.temperature, groups)  # fmt: skip
                t, m_ = whole["T"], whole["mask"]
                s["values"] = torch.zeros_like(roll.completion_mask)
                s["values"][:, :t] = outputs[1].detach().float() * m_
                s["entropy"] = torch.zeros_like(roll.completion_mask)
                s["entropy"][:, :t] = entropy_from_logits(outputs[0].detach()) * m_
            valid = out.valid.to(acc.device)
            # (B, T) the sampled tokens (tool results left out), skipped rows left out
            mask = roll.policy_mask.float() * valid[:, None]
            scores = out.total.to(mask)  # (B,)
            if cfg.whiten_rewards:
                scores = whiten_over_processes(acc, scores, valid.float())
            kl = (
                torch.zeros_like(mask)
                if ref is None
                else kl_fn(s["old_logp"], s["ref_logp"]) * mask
            )
            rewards = per_token_rewards(scores, kl, mask, beta=kl_ctl.value)  # (B, T)

            # 3. advantages and returns
            adv, returns = gae(rewards, s["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:  # over every process's tokens, as on one process
                adv = whiten_over_processes(acc, adv, mask)
            t3 = time.perf_counter()

            # 4. PPO epochs over shuffled mini-batches, each one optimizer step
            stats: dict[str, torch.Tensor] = {}
            grad_norms = []
            for _ in range(cfg.ppo_epochs):
                order = torch.arange(B) if single else torch.randperm(B)
                for mb_rows in order.split(cfg.mini_batch_size):
                    mb_tokens = step_tokens(acc, mask[mb_rows.to(mask.device)])
                    for idx in micro_batches(len(mb_rows), cfg.optim.grad_accum, mb_rows):
                        old = {"old_logp": None, "old_values": None} if single else {
                            "old_logp": s["old_logp"], "old_values": s["values"]}  # fmt: skip
                        mb = take(roll, idx, **old, adv=adv, returns=returns, loss_mask=mask,
                                  groups=roll.prompt_index)  # fmt: skip
                        mb = drop_left_padding(mb)
                        loss, m = minibatch_loss(
                            ac, mb, cfg, gen.temperature, outputs if single else None,
                            normaliser=normaliser,
                        )  # fmt: skip
                        w = accumulation_weight(
                            mb["loss_mask"], cfg.loss_reduction,
                            step_rows=len(mb_rows), step_tokens=mb_tokens,
                        )  # fmt: skip
                        acc.backward(loss * w)
                        for k, v in m.items():  # weighted: each optimizer step's sum is its mean
                            stats[k] = stats.get(k, 0.0) + v * w
                    grad_norms.append(clip_and_step(acc, ac, opt, sched, cfg.optim.max_grad_norm))
            t4 = time.perf_counter()

            # 5. KL controller, one flat record, samples, evaluation, checkpoint
            beta = kl_ctl.value
            seq_kl = float(acc.reduce(kl.sum(1).mean(), "mean"))  # nats per completion
            kl_ctl.update(seq_kl, B * acc.num_processes)
            rec = {
                **rollout_metrics(roll, out, s, reward_fn),
                **{k: float(v) / updates_per_step for k, v in stats.items()},
                "value/explained_variance": float(explained_variance(s["values"], returns, mask)),
                "value/mean": float(masked_mean(s["values"], mask)),
                "returns/mean": float(masked_mean(returns, mask)),
                "kl_coef": beta,
                "grad_norm": sum(grad_norms) / len(grad_norms),
                "lr": sched.get_last_lr()[0],
                "epoch": prompts.epoch,
                "time/generate": t1 - t0,
                "time/score": t2 - t1,
                "time/forward": t3 - t2,
                "time/train": t4 - t3,
            }
            samples = functools.partial(sample_records, roll, out, adv[:, 0], cfg.n_samples)
            evaluate_now = evaluate if eval_rows else None
            if end_of_step(
                step, cfg, acc=acc, run=run, rec=rec, samples=samples,
                evaluate=evaluate_now, save=save, stop=stop,
            ):  # fmt: skip
                return 130
    if eval_rows:
        evaluate(step)
    save_final(run, cfg, gen, policy, head, tok, critic)
    run.close()
    return 0
