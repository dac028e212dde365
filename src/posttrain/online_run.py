"""The skeleton of every online RL command (reinforce, rloo/grpo, ppo): setup, state save/restore,
the update over minibatches, the end of a step and the end of the run. Each algorithm file keeps
its config, its loss and its loop, which reads:

    o = OnlineRun(cfg, "grpo", n=cfg.samples_per_prompt, ref=cfg.ref, kl_coef=cfg.kl_coef)
    model = o.prepare(o.policy, {"policy": o.policy}, updates_per_step)   # resume, eval at step 0
    for step in o.steps():
        roll, out = o.sample(cfg.batch_size)             # rollout and reward
        scores = score_rollout(...)                       # no-grad old/ref log-probs
        adv = ...                                         # the algorithm's advantages
        totals = o.update(model, loss_fn, ...)            # epochs x minibatches x micro-batches
        o.end_step(step, {...}, samples)                  # log, samples, eval, checkpoint
    return o.finish()                                     # final eval, final/ folder

  OnlineConfig        the fields every online command has (model, optimiser, run, task, ...)
  evaluate_policy     the task's metrics and the reward on validation rows
  rollout_metrics     reward, KL, entropy, length (and tool) metrics of a rollout
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from posttrain import tasks, train
from posttrain.config import LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.online import (
    GenOverrides,
    PromptStream,
    Scores,
    accumulation_weight,
    build_reference,
    micro_batches,
    no_sync_unless,
    resolve_generation,
    rollout_batch,
    step_tokens,
)
from posttrain.ops import KL_ESTIMATORS, masked_mean
from posttrain.rewards import RewardConfig, build_reward
from posttrain.rollout import GenerationConfig, Rollout, generate
from posttrain.tasks.base import TaskConfig, columns
from posttrain.tools import Toolbox, ToolConfig
from posttrain.train import (
    StopOnInterrupt,
    build_optimizer,
    build_scheduler,
    clip_and_step,
    load_policy,
    start,
)


@dataclass
class OnlineConfig:
    """The fields every online command shares; each command's Config adds its own."""

    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "adapter": "model.adapter",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    steps: int = check(100, ">= 1")
    """rollout batches: each samples fresh completions, then trains on them (reinforce: one optimizer step; grpo, rloo, ppo: update_epochs x num_minibatches)"""
    batch_size: int = check(8, ">= 1")
    """prompts per rollout batch (on each process)"""
    samples_per_prompt: int = check(1, ">= 1")
    """completions sampled per prompt (rollout rows = batch_size * samples_per_prompt; grpo and rloo: the group, at least 2)"""
    kl_coef: float = check(0.0, ">= 0")
    """beta, the KL coefficient (ppo: its start under the adaptive controller; 0: no KL, no reference needed)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL estimator: k1 = log(pi/ref), k3 = ref/pi - log(ref/pi) - 1"""
    ref: Literal["auto", "copy", "adapter", "none"] = "auto"
    """reference policy: auto (none if kl_coef is 0, adapter under a fresh LoRA adapter, else copy: also from --model.adapter), copy (a frozen copy), adapter (the base weights with the LoRA adapter off), none"""
    eval_limit: int = check(64, ">= 0")
    """validation rows scored at the start and the end (0: no evaluation)"""
    eval_every: int = check(0, ">= 0")
    """also evaluate every this many steps (0: start and end only)"""
    n_samples: int = check(8, ">= 0")
    """rollout rows written to samples.jsonl every run.sample_every steps"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    gen: GenOverrides = field(default_factory=GenOverrides)
    reward: RewardConfig = field(default_factory=RewardConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)


MicroLoss = Callable[[Tensor], tuple[Tensor, dict[str, Tensor], Tensor]]
"""rows (b,) -> (their loss, its metrics, their loss mask (b, T')), for `OnlineRun.update`"""


class OnlineRun:
    """One online run: the accelerator, run folder, task, generation settings, policy, tokenizer,
    toolbox, reference policy, reward, prompt stream and validation rows, built in that order.

    The reference is built before any checkpoint is loaded, so "copy" holds the initial weights.
    The policy stays in eval mode for the whole run (dropout off): the sampler, the scoring pass
    and the training forward are one function, so an on-policy ratio is 1 (issue #16)."""

    def __init__(self, cfg: Any, command: str, *, n: int, ref: str, kl_coef: float):
        self.cfg = cfg
        self.acc, self.run = start(cfg, command)
        self.task = tasks.load_task(cfg.task)
        self.gen: GenerationConfig = resolve_generation(self.task.generation(), cfg.gen, n=n)
        self.policy, self.tok = load_policy(
            cfg.model, cfg.lora, self.acc.device, onednn=cfg.run.onednn
        )
        self.policy.eval()
        self.toolbox = Toolbox.from_config(cfg.tools)  # None without tools.names
        self.ref = build_reference(ref, self.policy, kl_coef, adapter=cfg.model.adapter)
        self.reward_fn = build_reward(cfg.reward, self.task, self.acc.device)
        acc = self.acc
        self.prompts = PromptStream(
            self.task.rows("train"), cfg.run.seed, acc.process_index, acc.num_processes
        )
        self.eval_rows = self.task.rows("validation")[: cfg.eval_limit] if cfg.eval_limit else []
        self.first = 1
        self.stop: StopOnInterrupt | None = None

    # -- setup that needs the trainable module --------------------------------------------------

    def prepare(
        self, trainable: Any, modules: dict[str, Any], updates_per_step: int, **state: Any
    ) -> Any:
        """AdamW and the schedule over `trainable`; on --run.resume, load the checkpoint into
        `modules`, the prompt stream, the reward's running statistics and each `state` object
        (anything with state_dict/load_state_dict); accelerate.prepare; evaluate at step 0 on a
        fresh run. Returns the prepared module."""
        cfg = self.cfg
        self.modules = modules
        self.state = {"prompts": self.prompts, "reward": self.reward_fn, **state}
        opt = build_optimizer(trainable, cfg.optim)
        self.sched = build_scheduler(opt, cfg.optim, cfg.steps * updates_per_step)
        if cfg.run.resume:
            saved = self.run.load_checkpoint(modules, opt, self.sched)
            for key, obj in self.state.items():
                obj.load_state_dict(saved[key])
            self.first = saved["step"] + 1
        model, self.opt = self.acc.prepare(trainable, opt)
        if self.eval_rows and self.first == 1:
            self.evaluate(0)
        return model

    # -- the loop ---------------------------------------------------------------------------------

    def steps(self) -> Iterator[int]:
        """Step numbers from the first not yet done to cfg.steps. The loop body runs with Ctrl-C
        turned into a flag (the step finishes and checkpoints, then the loop ends) and under
        accelerate's autocast: every forward (sampler, reference, policy) in the prepared
        policy's precision, so a frozen reference does not run in fp32 beside a bf16 policy."""
        with train.StopOnInterrupt() as self.stop, self.acc.autocast():
            for step in range(self.first, self.cfg.steps + 1):
                yield step
                if self.stop.requested:
                    return

    def sample(self, batch_size: int) -> tuple[Rollout, Any, float]:
        """The next batch_size prompts, gen.n completions each (rows of a prompt contiguous), and
        their rewards -> (rollout, reward output, seconds spent sampling and rewarding). Each prompt samples
        from a seed of its global position in the stream: N processes x B prompts sample what
        1 process x N B prompts does, and a resumed run what the uninterrupted one did."""
        t0 = time.perf_counter()
        rows, seeds = self.prompts.draw(batch_size)
        prompts = [r["prompt"] for r in rows]
        roll = generate(self.policy, self.tok, prompts, self.gen, seeds=seeds, tools=self.toolbox)
        out = self.reward_fn(roll.prompts, roll.completions, rollout_batch(rows, roll))
        return roll, out, time.perf_counter() - t0

    def update(
        self,
        model: Any,
        loss_fn: MicroLoss,
        loss_mask: Tensor,
        *,
        epochs: int,
        minibatches: Callable[[Tensor], list[Tensor]],
        reduction: str,
        shuffle: bool,
    ) -> dict[str, float]:
        """`epochs` passes over the rollout's rows (B = loss_mask's rows), each in a fresh
        shuffled order if `shuffle`, split by `minibatches(order)`; each minibatch is one
        optimizer step over optim.grad_accum micro-batches whose weighted losses sum to the
        minibatch's loss (`accumulation_weight`, the token mean over all processes' tokens).
        Returns the metrics averaged over the updates, grad_norm, and lr after the steps."""
        acc, cfg = self.acc, self.cfg
        B = loss_mask.shape[0]
        chunks_of = [
            [micro_batches(len(mb), cfg.optim.grad_accum, mb) for mb in minibatches(order)]
            for order in (torch.randperm(B) if shuffle else torch.arange(B) for _ in range(epochs))
        ]
        n_updates = sum(len(e) for e in chunks_of)
        totals: dict[str, float] = {}
        norms = []
        for epoch in chunks_of:
            for chunks in epoch:
                rows = torch.cat(chunks)
                tokens = step_tokens(acc, loss_mask[rows.to(loss_mask.device)])
                for j, idx in enumerate(chunks):
                    with no_sync_unless(acc, model, last=j == len(chunks) - 1):
                        loss, m, mask = loss_fn(idx)
                        w = accumulation_weight(
                            mask, reduction, step_rows=len(rows), step_tokens=tokens
                        )
                        acc.backward(loss * w)
                    for k, v in m.items():  # weighted: each optimizer step's sum is its mean
                        totals[k] = totals.get(k, 0.0) + float(v) * w / n_updates
                norms.append(
                    clip_and_step(acc, model, self.opt, self.sched, cfg.optim.max_grad_norm)
                )
        return totals | {"grad_norm": sum(norms) / len(norms), "lr": self.sched.get_last_lr()[0]}

    def end_step(self, step: int, rec: dict[str, float], samples: list[dict[str, Any]]) -> None:
        """Log the (process-averaged) record, write samples, evaluate every cfg.eval_every steps,
        checkpoint (periodically, on Ctrl-C and at the last step)."""
        cfg, run = self.cfg, self.run
        if step % cfg.run.log_every == 0 or step == cfg.steps:
            run.log(step, reduce_mean(self.acc, rec | {"epoch": self.prompts.epoch}))
        if cfg.run.sample_every and step % cfg.run.sample_every == 0:
            run.samples(step, samples)
        if self.eval_rows and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            self.evaluate(step)
        stopping = self.stop is not None and self.stop.requested
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or stopping or step == cfg.steps:
            state = {key: obj.state_dict() for key, obj in self.state.items()}
            run.save_checkpoint(step, self.modules, self.opt, self.sched, state)
        if stopping:
            print(f"stopped at step {step}; resume with --run.resume {run.path}", flush=True)

    def evaluate(self, step: int) -> None:
        """The task's metrics and the reward on the validation rows (eval_before.json /
        eval_after.json for the report), in the training's precision."""
        with self.acc.autocast():
            metrics, samples = evaluate_policy(
                self.policy, self.tok, self.task, self.reward_fn, self.eval_rows, self.gen,
                self.toolbox,
            )  # fmt: skip
        rec = self.run.log(step, reduce_mean(self.acc, metrics))
        self.run.eval_record(step, rec, samples)
        self.run.samples(step, samples)

    def finish(self, save_extra: Callable[[Any], None] | None = None) -> int:
        """130 after Ctrl-C; else the last evaluation and run/final/: the policy (adapter or
        full weights), tokenizer, posttrain.json (task, prompt format, tools) and what
        save_extra(folder) writes (PPO's value head). Returns the exit status."""
        from posttrain.runs import write_online_format

        if self.stop is not None and self.stop.requested:
            return 130
        if self.eval_rows:
            self.evaluate(max(self.first - 1, self.cfg.steps))
        if self.acc.is_main_process:
            final = self.run.path / "final"
            self.policy.save_pretrained(final)
            self.tok.save_pretrained(final)
            if save_extra is not None:
                save_extra(final)
            write_online_format(self.run, self.cfg, self.gen)
        self.run.close()
        return 0


def sequence_rewards(
    out: Any, scores: Scores, mask: Tensor, *, kl_coef: float, estimator: str, in_reward: bool
) -> tuple[Tensor, Tensor]:
    """(rewards (B,), valid (B,)): the reward, minus kl_coef x the sequence's summed KL estimate
    to the reference when the KL goes in the reward (no gradient through it). mask (B, T)."""
    valid = out.valid.to(mask.device)
    rewards = out.total.to(mask.device)
    if in_reward and scores.ref_logp is not None:
        kl = KL_ESTIMATORS[estimator](scores.old_logp, scores.ref_logp)  # (B, T)
        rewards = rewards - kl_coef * (kl * mask).sum(1)
    return rewards, valid


# ---------------------------------------------------------------------------------------------
# Evaluation, samples, metrics


def evaluate_policy(
    model: Any,
    tok: Any,
    task: Any,
    reward_fn: Any,
    rows: list[dict[str, Any]],
    gen: GenerationConfig,
    tools: Toolbox | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """One completion per validation row: the task's metrics and the mean training reward.
    tools: the toolbox the policy trains with, so that it is evaluated as it is trained.

    -> ({"eval/<metric>": value, "eval/reward": mean}, sample records).
    """
    prompts = [r["prompt"] for r in rows]
    roll = generate(model, tok, prompts, dataclasses.replace(gen, n=1), tools=tools)
    batch = columns(rows)
    summary, _ = task.evaluate(roll.completions, batch)
    out = reward_fn(roll.prompts, roll.completions, batch, update_stats=False)
    raw = out.raw_total if out.raw_total is not None else out.total
    metrics = {
        f"eval/{k}": float(v)
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    metrics["eval/reward"] = float(raw[out.valid].mean()) if out.valid.any() else float("nan")
    samples = [
        {"split": "validation", "prompt": p, "completion": c, "reward": float(r)}
        for p, c, r in zip(roll.prompts[:4], roll.completions[:4], raw[:4])
    ]
    if roll.tool_calls is not None:
        metrics.update({f"eval/{k}": v for k, v in tool_metrics(roll).items()})
        for i, rec in enumerate(samples):
            rec["tool_calls"] = roll.tool_records(i)
    return metrics, samples


def sample_records(roll: Rollout, out: Any, adv: Tensor, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rollout rows as JSON records: prompt, completion, reward, components, adv,
    and with tools the calls each completion made (`tool_calls`: tool, call, result, error)."""
    recs = []
    for i in range(min(limit, len(roll))):
        rec: dict[str, Any] = {
            "prompt": roll.prompts[i],
            "completion": roll.completions[i],
            "reward": float(out.total[i]),
            "adv": float(adv[i]),
            "finish": roll.finish_reasons[i],
        }
        rec.update({f"reward/{k}": float(v[i]) for k, v in out.components.items()})
        if roll.tool_calls is not None:
            rec["tool_calls"] = roll.tool_records(i)
        recs.append(rec)
    return recs


def reduce_mean(acc: Any, metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes (a no-op on one process)."""
    if acc.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], device=acc.device)
    t = acc.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def rollout_metrics(roll: Rollout, out: Any, scores: Scores, reward_fn: Any) -> dict[str, float]:
    """What every online step logs about its samples: reward (mean/std/components/skipped),
    sequence KL to the reference (k1, k3, exact), token entropy, completion length, all over the
    tokens the policy sampled (`Rollout.policy_mask`); with tools, `tool_metrics` too."""
    mask = roll.policy_mask  # (B, T) tool-inserted tokens left out
    valid = out.valid
    raw = (out.raw_total if out.raw_total is not None else out.total)[valid]
    m: dict[str, float] = {
        "reward/mean": float(raw.mean()) if len(raw) else float("nan"),
        "reward/std": float(raw.std()) if len(raw) > 1 else 0.0,
        **reward_fn.metrics(out),
        "completion_length": float(mask.sum(1).mean()),
        "completion_eos": sum(r != "length" for r in roll.finish_reasons) / len(roll),
    }
    if scores.entropy is not None:
        m["entropy"] = float(masked_mean(scores.entropy, mask))
    if scores.ref_logp is not None:
        for name, kl in KL_ESTIMATORS.items():
            m[f"kl/{name}"] = float((kl(scores.old_logp, scores.ref_logp) * mask).sum(1).mean())
        if scores.kl_exact is not None:
            m["kl/exact"] = float(scores.kl_exact.sum(1).mean())
    if roll.tool_calls is not None:
        m.update(tool_metrics(roll))
    return m


def tool_metrics(roll: Rollout) -> dict[str, float]:
    """tools/calls: calls per completion; tools/errors: the share of calls that got an error text;
    tools/tokens: tool-inserted tokens per completion (not in completion_length)."""
    calls = [c for row in roll.tool_calls or [] for c in row]
    return {
        "tools/calls": len(calls) / max(len(roll), 1),
        "tools/errors": sum(c.error for c in calls) / len(calls) if calls else 0.0,
        "tools/tokens": float((roll.completion_mask - roll.policy_mask).sum(1).mean()),
    }
