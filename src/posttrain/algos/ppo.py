"""PPO with a value head, GAE and an adaptive KL controller (Ziegler et al. 2019).

Fine-Tuning Language Models from Human Preferences (Ziegler et al. 2019), on top of PPO (Schulman
et al. 2017) and GAE (Schulman et al. 2016). Each step:

  1. sample one completion per prompt from the policy (`rollout.generate`);
  2. score it: the reward at the last completion token, minus beta * KL(policy || reference) at
     every token (`per_token_rewards`), the KL from the k1 (or k3) estimator on the sampled tokens;
  3. values from a scalar head on the policy's last hidden states (or a separate critic), GAE
     advantages and returns (`advantages.gae`), advantages whitened over the batch;
  4. `update_epochs` passes over `num_minibatches` shuffled minibatches: clipped policy loss
     (`ops.clipped_surrogate`, eps = `clip_range`), clipped value loss (`value_loss`) times
     vf_coef, entropy bonus (`entropy_loss`) times ent_coef;
  5. adapt beta (`kl_coef`, its start) towards `kl_target` (`AdaptiveKLController`) or keep it fixed.

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

from posttrain.advantages import gae
from posttrain.config import ConfigError, OptimConfig, Renamed, check
from posttrain.online import (
    MicroBatch,
    accumulation_weight,
    micro_batches,
    sampler_weighted,
    score_rollout,
    step_tokens,
    take,
    whiten_over_processes,
)
from posttrain.online_run import OnlineConfig, OnlineRun, rollout_metrics, sample_records
from posttrain.ops import (
    KL_ESTIMATORS,
    Reduction,
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    explained_variance,
    masked_mean,
    selective_log_softmax,
)
from posttrain.tasks.base import TaskConfig
from posttrain.train import load_policy, uses_run_settings
from posttrain.value_head import (
    ActorCritic,
    ValueHead,
    hidden_size,
    load_value_head,
    prepare_critic,
    save_value_head,
)


def _ppo_task() -> TaskConfig:
    return TaskConfig(name="summarization")


def _minibatches_from_size(cfg: Any, size: int) -> int:
    """The old `mini_batch_size` (rows per minibatch) as `num_minibatches`."""
    rows = cfg.batch_size * cfg.samples_per_prompt
    if not 1 <= size <= rows:
        raise ConfigError(
            f"mini_batch_size={size} must be between 1 and the rollout rows "
            f"batch_size * samples_per_prompt = {rows}"
        )
    return math.ceil(rows / size)


@dataclass
class Config(OnlineConfig):
    RENAMED: ClassVar[dict[str, Any]] = {
        "ppo_epochs": "update_epochs",
        "mini_batch_size": Renamed(
            "num_minibatches", _minibatches_from_size, hint="= rollout rows / mini_batch_size"
        ),
        "cliprange": "clip_range",
        "cliprange_value": "clip_range_value",
        "kl.coef": "kl_coef",
        "kl.controller": "kl_controller",
        "kl.target": "kl_target",
        "kl.horizon": "kl_horizon",
        "kl.estimator": "kl_estimator",
        "kl.ref": "ref",
    }
    steps: int = check(50, ">= 1")
    update_epochs: int = check(4, ">= 1")
    """passes over each rollout batch, each in a fresh shuffled order"""
    num_minibatches: int = check(2, ">= 1")
    """optimizer steps per pass, on nearly equal shares of the rollout rows (each split into optim.grad_accum micro-batches)"""
    gamma: float = check(1.0, "in [0, 1]")
    """discount factor (1: undiscounted, as in Ziegler et al.)"""
    lam: float = check(0.95, "in [0, 1]")
    """GAE lambda"""
    clip_range: float = check(0.2, ">= 0")
    """policy ratio clip: [1 - clip_range, 1 + clip_range]"""
    clip_range_value: float = check(0.2, ">= 0")
    """value clip: new values stay within this distance of the rollout's values"""
    kl_coef: float = check(0.2, ">= 0")
    kl_controller: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: move beta towards kl_target (Ziegler et al. 2019); fixed: keep beta"""
    kl_target: float = check(6.0, "> 0")
    """adaptive: target KL per completion in nats (summed over its tokens)"""
    kl_horizon: int = check(10000, ">= 1")
    """adaptive: horizon in samples; beta changes by at most 20% per `kl_horizon` samples"""
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
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1.41e-5))
    task: TaskConfig = field(default_factory=_ppo_task)

    def validate(self) -> None:
        rows = self.batch_size * self.samples_per_prompt
        if self.num_minibatches > rows:
            raise ConfigError(
                f"num_minibatches={self.num_minibatches} must be at most the rollout rows "
                f"batch_size * samples_per_prompt = {rows}"
            )
        if self.optim.grad_accum > rows // self.num_minibatches:
            raise ConfigError(
                f"optim.grad_accum={self.optim.grad_accum} splits each minibatch into micro-batches: "
                f"it cannot exceed the rows of a minibatch, {rows // self.num_minibatches}"
            )


# ---------------------------------------------------------------------------------------------
# Losses (pure)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_value: float,
    reduction: Reduction = "token_mean",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss. All inputs (B, T).

    v_clip = old_values + clip(values - old_values, -c, c)       c = clip_range_value
    loss_t = 0.5 * max((values - returns)^2, (v_clip - returns)^2)
    Metrics: clip_fraction (share of tokens where the clipped error is the larger one).
    """
    c = clip_range_value
    v_clip = old_values + torch.clamp(values - old_values, -c, c)
    err = (values - returns) ** 2
    err_clip = (v_clip - returns) ** 2
    loss = aggregate_loss(0.5 * torch.maximum(err, err_clip), mask, reduction, normaliser)
    return loss, {"clip_fraction": masked_mean((err_clip > err).float(), mask).detach()}


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


def kl_controller(cfg: Config) -> AdaptiveKLController | FixedKLController:
    if cfg.kl_controller == "adaptive":
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ---------------------------------------------------------------------------------------------
# Helpers for main


def minibatch_loss(
    ac: Any,
    mb: MicroBatch,
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
    forward here. old_logp / old_values None in mb: on-policy, they are logp / values detached.
    mb.loss_mask None: mb.mask."""
    if outputs is None:
        outputs = ac(mb.input_ids, mb.attention_mask, mb.T, temperature, mb.groups)
    logits, values = outputs
    logp = selective_log_softmax(logits, mb.completion_ids)  # (b, T')
    old_logp = logp.detach() if mb.old_logp is None else mb.old_logp
    old_values = values.detach() if mb.old_values is None else mb.old_values
    m = mb.mask if mb.loss_mask is None else mb.loss_mask
    red = {"reduction": cfg.loss_reduction, "normaliser": normaliser}
    pg, pg_m = clipped_surrogate(logp, old_logp, mb.adv, m, clip_range=cfg.clip_range, **red)
    vf, vf_m = value_loss(values, old_values, mb.returns, m, clip_range_value=cfg.clip_range_value, **red)  # fmt: skip
    # without an entropy bonus the entropy is only logged: keep it out of the backward graph
    ent_tok = entropy_from_logits(logits if cfg.ent_coef else logits.detach())
    ent, _ = entropy_loss(ent_tok, m, **red)
    loss = pg + cfg.vf_coef * vf + cfg.ent_coef * ent
    metrics = {"loss/policy": pg, "loss/value": vf, "loss/entropy": ent, "loss/total": loss}
    metrics |= pg_m | {f"value/{k}": v for k, v in vf_m.items()}
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Training loop


@uses_run_settings
def main(cfg: Config) -> int:
    o = OnlineRun(cfg, "ppo", n=cfg.samples_per_prompt, ref=cfg.ref, kl_coef=cfg.kl_coef)
    acc, policy = o.acc, o.policy
    normaliser = cfg.fixed_normaliser or o.gen.max_new_tokens  # `fixed`: a constant (issue #16)
    critic = None
    if cfg.critic == "separate":
        critic = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)[0]
        critic = prepare_critic(critic)
    head = load_value_head(cfg.value_head) if cfg.value_head else ValueHead(hidden_size(policy))
    ac = ActorCritic(policy, head.to(acc.device), critic)
    ac.eval()  # dropout off: the ratio on a freshly sampled batch is exactly 1
    B = cfg.batch_size * cfg.samples_per_prompt  # rollout rows per step (per process)
    updates_per_step = cfg.update_epochs * cfg.num_minibatches  # optimizer steps
    # one update from one forward per rollout: that forward's values give the advantages and its
    # logits the loss (no scoring forward of the policy; ratio 1 and value clip inactive exactly)
    on_policy = updates_per_step == 1 and cfg.optim.grad_accum == 1
    # ... and with a separate critic on one process, the critic's forward and its value loss's
    # backward before the policy's forward: the peak holds one model's activations, not both
    # (under DDP/FSDP both forwards go through the prepared module, and its one backward)
    critic_first = on_policy and critic is not None and acc.num_processes == 1
    kl_ctl = kl_controller(cfg)
    modules = {"policy": policy, "value_head": head} | ({"critic": critic} if critic else {})
    ac = o.prepare(ac, modules, updates_per_step, kl_ctl=kl_ctl)
    for step in o.steps():
        # 1. rollout and the task reward
        roll, out, t_gen = o.sample(cfg.batch_size)
        t2 = time.perf_counter()
        # 2. per-token rewards: the score at the last token, -beta * KL at every token
        n_fwd = math.ceil(B / cfg.forward_batch_size)
        s = score_rollout(
            ac, o.ref, roll, temperature=o.gen.temperature, n_micro=n_fwd, on_policy=on_policy,
            forward=ac, sampler_weight_cap=o.gen.sampler_weight_cap,
        )  # fmt: skip
        outputs = None
        if on_policy:  # the training forward, before the advantages that its values give
            whole = take(roll, torch.arange(B))  # each prompt (and their common start) run once
            if critic_first:  # the critic alone now, the policy after its backward (below)
                values = acc.unwrap_model(ac).critic_values(whole.input_ids, whole.attention_mask, whole.T)  # fmt: skip
            else:
                outputs = ac(whole.input_ids, whole.attention_mask, whole.T, o.gen.temperature, whole.groups)  # fmt: skip
                values = outputs[1]
            s.values = torch.zeros_like(roll.completion_mask)
            s.values[:, : whole.T] = values.detach().float() * whole.mask
        valid = out.valid.to(acc.device)
        # (B, T) the sampled tokens (tool results left out), skipped rows left out
        mask = roll.policy_mask.float() * valid[:, None]
        scores = out.total.to(mask)  # (B,)
        if cfg.whiten_rewards:
            scores = whiten_over_processes(acc, scores, valid.float())
        kl = torch.zeros_like(mask)
        if o.ref is not None:
            kl = KL_ESTIMATORS[cfg.kl_estimator](s.old_logp, s.ref_logp) * mask
        rewards = per_token_rewards(scores, kl, mask, beta=kl_ctl.value)  # (B, T)
        # 3. advantages and returns
        adv, returns = gae(rewards, s.values, mask, gamma=cfg.gamma, lam=cfg.lam)
        if cfg.whiten_advantages:  # over every process's tokens, as on one process
            adv = whiten_over_processes(acc, adv, mask)
        if critic_first:
            outputs = _critic_first(acc, ac, whole, values, returns, mask, cfg, o.gen.temperature, normaliser)  # fmt: skip
        if on_policy:
            s.entropy = torch.zeros_like(roll.completion_mask)
            s.entropy[:, : whole.T] = entropy_from_logits(outputs[0].detach()) * whole.mask
        t3 = time.perf_counter()
        # 4. update epochs over shuffled minibatches, each one optimizer step
        # on policy: old_logp / old_values are the training forward's, detached (None here)
        loss_fn = functools.partial(
            _micro_loss, ac, roll, old_logp=None if on_policy else s.old_logp,
            old_values=None if on_policy else s.values, adv=sampler_weighted(adv, s),
            returns=returns, mask=mask, cfg=cfg, temperature=o.gen.temperature, outputs=outputs,
            normaliser=normaliser,
        )  # fmt: skip
        totals = o.update(
            ac, loss_fn, mask, epochs=cfg.update_epochs,
            minibatches=lambda order: micro_batches(len(order), cfg.num_minibatches, order),
            reduction=cfg.loss_reduction, shuffle=not on_policy,
        )  # fmt: skip
        t4 = time.perf_counter()
        # 5. KL controller, one flat record
        beta = kl_ctl.value
        seq_kl = float(acc.reduce(kl.sum(1).mean(), "mean"))  # nats per completion
        kl_ctl.update(seq_kl, B * acc.num_processes)
        rec = {
            **rollout_metrics(roll, out, s, o.reward_fn),
            **totals,
            "value/explained_variance": float(explained_variance(s.values, returns, mask)),
            "value/mean": float(masked_mean(s.values, mask)),
            "returns/mean": float(masked_mean(returns, mask)),
            "kl_coef": beta,
            "time/generate": t_gen,
            "time/score": t3 - t2,
            "time/train": t4 - t3,
        }
        o.end_step(step, rec, sample_records(roll, out, adv[:, 0], cfg.n_samples))

    def save_extra(folder: Any) -> None:  # the value head (and the separate critic)
        save_value_head(head, folder)
        if critic is not None:
            critic.save_pretrained(str(folder / "critic"))

    return o.finish(save_extra)


def _critic_first(
    acc: Any, ac: Any, whole: MicroBatch, values: torch.Tensor, returns: torch.Tensor,
    mask: torch.Tensor, cfg: Config, temperature: float, normaliser: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One-update PPO with a separate critic, in two backwards: the value loss of `values` (the
    critic's forward over all rows of `whole`, with grad) times vf_coef now, which frees the
    critic's graph, then the policy's forward. returns and mask (B, T) over the rollout's width.
    Returns (logits, values detached) for `minibatch_loss`, whose value term then carries no
    gradient: the sum of the two backwards is the one backward of policy_loss + vf_coef *
    value_loss (the two models share no parameter), the logged losses are the same."""
    returns, mask = returns[:, : whole.T], mask[:, : whole.T]  # as `take` cuts them
    red = {"reduction": cfg.loss_reduction, "normaliser": normaliser}
    vf, _ = value_loss(values, values.detach(), returns, mask, clip_range_value=cfg.clip_range_value, **red)  # fmt: skip
    rows = mask.shape[0]
    w = accumulation_weight(mask, cfg.loss_reduction, step_rows=rows, step_tokens=step_tokens(acc, mask))  # fmt: skip
    acc.backward(cfg.vf_coef * vf * w)
    model = acc.unwrap_model(ac)
    logits = model.policy_logits(whole.input_ids, whole.attention_mask, whole.T, temperature)
    return logits, values.detach()


def _micro_loss(
    ac: Any, roll: Any, idx: torch.Tensor, *, old_logp: torch.Tensor | None,
    old_values: torch.Tensor | None, adv: torch.Tensor,
    returns: torch.Tensor, mask: torch.Tensor, cfg: Config, temperature: float,
    outputs: Any, normaliser: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    """`minibatch_loss` on some rollout rows (each prompt once) -> (loss, metrics, loss mask)."""
    mb = take(
        roll, idx, old_logp=old_logp, old_values=old_values, adv=adv, returns=returns,
        loss_mask=mask,
    )  # fmt: skip
    loss, m = minibatch_loss(ac, mb, cfg, temperature, outputs, normaliser=normaliser)
    return loss, m, mb.loss_mask
