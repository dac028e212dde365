"""Direct preference optimisation (Rafailov et al. 2023), with IPO, conservative DPO and SimPO.

DPO trains the policy on (prompt, chosen, rejected) pairs without a reward model or sampling:

    h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
    loss = -log sigmoid(beta * h)

Log-probs are sums over completion tokens only (the prompt is masked), and chosen and rejected go
through the model in one concatenated forward pass. The reference is the policy at the start of
training, either precomputed once before training and cached in the run directory (default: no
reference model in memory while training), a frozen copy, or the policy with its LoRA adapter
disabled (the base model). Variants are separate pure functions chosen by `LossType`:
IPO (Azar et al. 2023, length-normalised log-probs as in TRL), cDPO (label smoothing, Mitchell
2023) and SimPO (Meng et al. 2024, reference-free, length-normalised).

    posttrain dpo --data.source=pairs.jsonl --beta=0.1 --optim.lr=5e-7
    posttrain dpo --config configs/dpo_sentiment.toml            # build pairs, train, evaluate
    posttrain dpo --config configs/dpo_sentiment.toml --sweep.betas=[0.05,0.1,0.5]

Tools (`[tools]`, `--tool calculator`): completions that hold tool calls get no log-prob on the
tool results (`preferences.tokenize_pairs(tools=)`: the loss mask leaves them out, in the policy's
and the reference's sums and in the length normalisation); pairs built with --build.enabled are
sampled with the tools, and the task evaluation samples with them too.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from posttrain.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.forwards import completion_logits_shared
from posttrain.offline import Objective, fit, share
from posttrain.ops import masked_sum, selective_log_softmax
from posttrain.pair_building import pair_records
from posttrain.preferences import (
    BuildConfig,
    PairBatch,
    PairsConfig,
    collate_pairs,
    tokenize_pairs,
)
from posttrain.tasks.base import TaskConfig
from posttrain.tools import Toolbox, ToolConfig
from posttrain.train import uses_run_settings

Metrics = dict[str, torch.Tensor]


class LossType(str, Enum):
    DPO = "dpo"
    IPO = "ipo"
    CDPO = "cdpo"
    SIMPO = "simpo"

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares against reference log-probs."""
        return self is not LossType.SIMPO

    @property
    def length_normalized(self) -> bool:
        """Whether log-probs are averaged over completion tokens instead of summed."""
        return self in (LossType.IPO, LossType.SIMPO)


@dataclass
class EvalConfig:
    enabled: bool = False
    """sample on the task's eval split before and after training: mean reward + task metrics"""
    split: str = "test"
    """task split to evaluate on"""
    before: bool = True
    """also evaluate before training (logged at step 0)"""
    max_new_tokens: int = check(0, ">= 0")
    """tokens per completion (0: the task's default)"""


@dataclass
class SweepConfig:
    betas: list[float] = field(default_factory=list)
    """run once per beta (one run directory each, same pairs) and plot the loss curves together"""


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "data": "data.source",
        "loss": "loss_type",
        "tool": "tools.names",
    }
    RENAMED: ClassVar[dict[str, str]] = {"eval.size": "eval_limit"}  # docs/glossary.md
    loss_type: LossType = LossType.DPO
    """dpo, ipo, cdpo (label-smoothed) or simpo (reference-free)"""
    beta: float = check(0.1, "> 0")
    """inverse temperature of the implicit reward; smaller stays closer to the reference"""
    label_smoothing: float = check(0.1, "in [0, 1]")
    """cdpo: probability that a preference label is flipped"""
    simpo_gamma: float = 0.5
    """simpo: target reward margin"""
    reference: Literal["precomputed", "frozen_copy", "adapter_disabled"] = "precomputed"
    """reference log-probs: computed once before training, a frozen model copy, or LoRA switched off"""
    epochs: int = check(1, ">= 1")
    """passes over the training pairs"""
    max_steps: int = check(0, ">= 0")
    """stop after this many optimizer steps (0: epochs decide)"""
    batch_size: int = check(4, ">= 1")
    """pairs per micro-batch (2x rows in the forward pass); x optim.grad_accum per step"""
    eval_every: int = check(0, ">= 0")
    """held-out loss/accuracy every this many steps (0: at the end only)"""
    eval_limit: int = check(64, ">= 1")
    """task prompts sampled and scored by the [eval] evaluation (eval.enabled)"""
    eval_batch_size: int = check(16, ">= 1")
    """pairs per forward pass when evaluating or precomputing reference log-probs"""
    reference_cache: str | None = None
    """reference_logps.json of a run on the same pairs and starting model: reused, not recomputed"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6))
    run: RunConfig = field(default_factory=RunConfig)
    data: PairsConfig = field(default_factory=PairsConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)

    def validate(self) -> None:
        if self.reference == "adapter_disabled" and not self.lora.enabled:
            raise ConfigError("reference=adapter_disabled needs --lora.enabled=true")
        if self.sweep.betas and self.run.resume:
            raise ConfigError("a beta sweep cannot be resumed; resume its runs one by one")


# ---------------------------------------------------------------------------------------------
# Losses: sequence log-probs (B,) in, (loss, metrics) out


def _metrics(
    loss: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
) -> Metrics:
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "loss": loss.detach(),
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/accuracy": (c > r).float().mean(),
        "rewards/margin": (c - r).mean(),
        "logps/chosen": logp_chosen.detach().mean(),
        "logps/rejected": logp_rejected.detach().mean(),
    }


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """-log sigmoid(beta * h), h = chosen log-ratio - rejected log-ratio; mean over pairs."""
    chosen = beta * (logp_chosen - ref_logp_chosen)  # (B,) implicit rewards
    rejected = beta * (logp_rejected - ref_logp_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, _metrics(loss, chosen, rejected, logp_chosen, logp_rejected)


def cdpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[torch.Tensor, Metrics]:
    """Conservative DPO: labels flipped with probability eps,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    chosen = beta * (logp_chosen - ref_logp_chosen)
    rejected = beta * (logp_rejected - ref_logp_rejected)
    z = chosen - rejected
    eps = label_smoothing
    loss = (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)).mean()
    return loss, _metrics(loss, chosen, rejected, logp_chosen, logp_rejected)


def ipo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_logp_chosen: torch.Tensor,
    ref_logp_rejected: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, Metrics]:
    """IPO: (h - 1 / (2 beta))^2, a squared loss that keeps h at a finite target (beta is IPO's tau).

    Pass token-mean log-probs (LossType.IPO.length_normalized), as TRL does."""
    h = (logp_chosen - ref_logp_chosen) - (logp_rejected - ref_logp_rejected)
    loss = ((h - 1 / (2 * beta)) ** 2).mean()
    chosen = beta * (logp_chosen - ref_logp_chosen)
    rejected = beta * (logp_rejected - ref_logp_rejected)
    return loss, _metrics(loss, chosen, rejected, logp_chosen, logp_rejected)


def simpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: -log sigmoid(beta (avg logp_w - avg logp_l) - gamma); no reference model."""
    chosen, rejected = beta * logp_chosen, beta * logp_rejected
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, _metrics(loss, chosen, rejected, logp_chosen, logp_rejected)


def preference_loss(
    cfg: Config, logp: torch.Tensor, ref_logp: torch.Tensor | None
) -> tuple[torch.Tensor, Metrics]:
    """Dispatch on cfg.loss_type. logp/ref_logp (2B,): chosen rows then rejected rows."""
    lc, lr = logp.chunk(2)
    if cfg.loss_type is LossType.SIMPO:
        return simpo_loss(lc, lr, beta=cfg.beta, gamma=cfg.simpo_gamma)
    assert ref_logp is not None
    rc, rr = ref_logp.chunk(2)
    if cfg.loss_type is LossType.DPO:
        return dpo_loss(lc, lr, rc, rr, beta=cfg.beta)
    if cfg.loss_type is LossType.CDPO:
        return cdpo_loss(lc, lr, rc, rr, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
    return ipo_loss(lc, lr, rc, rr, beta=cfg.beta)


# ---------------------------------------------------------------------------------------------
# Log-probs and the reference


def pair_logps(model: torch.nn.Module, batch: PairBatch) -> torch.Tensor:
    """Summed completion log-probs (2B,) of chosen and rejected rows in one forward pass; the two
    rows of a pair share their prompt, which runs once (`ops.completion_logits_shared`)."""
    T = batch.n_completion
    pair = torch.arange(batch.num_pairs, device=batch.input_ids.device).repeat(2)  # (2B,)
    logits = completion_logits_shared(
        model, batch.input_ids, batch.attention_mask, T, groups=pair
    )  # (2B, T, V)
    logp = selective_log_softmax(logits, batch.input_ids[:, -T:])
    return masked_sum(logp, batch.mask, dim=1)  # prompt and padding tokens masked out


@torch.no_grad()
def live_reference(model: torch.nn.Module, batch: PairBatch, adapter_off: bool) -> torch.Tensor:
    """Reference log-probs (2B,) from `model` in eval mode, with its LoRA adapter off if asked."""
    from posttrain.models import adapter_disabled

    was_training = model.training
    model.eval()
    try:
        with adapter_disabled(model) if adapter_off else contextlib.nullcontext():
            return pair_logps(model, batch)
    finally:
        model.train(was_training)


def precompute_reference(
    model: torch.nn.Module, items: list[dict[str, Any]], pad_id: int, batch_size: int
) -> list[list[float]]:
    """[chosen, rejected] summed reference log-probs per item, computed once before training."""
    device = next(model.parameters()).device
    out: list[list[float]] = []
    for s in range(0, len(items), batch_size):
        batch = collate_pairs(items[s : s + batch_size], pad_id).to(device)
        c, r = live_reference(model, batch, adapter_off=False).float().cpu().chunk(2)
        out += [[float(a), float(b)] for a, b in zip(c, r)]
    return out


def micro_batch_loss(
    cfg: Config,
    policy: torch.nn.Module,
    items: list[dict[str, Any]],
    pad_id: int,
    ref_model: torch.nn.Module | None,
    precision: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, Metrics]:
    """The loss of one micro-batch of pairs: one policy forward pass, reference from the items'
    cached "ref" values, `ref_model`, or the policy with its adapter off (cfg.reference).

    precision: the policy's autocast (`Accelerator.autocast`), for the reference passes: under
    accelerate's mixed precision only the prepared policy's forward runs in it."""
    device = next(policy.parameters()).device
    batch = collate_pairs(items, pad_id).to(device)
    logp = pair_logps(policy, batch)  # (2B,)
    ref = None
    if cfg.loss_type.needs_reference:
        if cfg.reference == "precomputed":
            ref = torch.tensor([it["ref"][0] for it in items] + [it["ref"][1] for it in items])
            ref = ref.to(device)
        elif cfg.reference == "frozen_copy":
            assert ref_model is not None
            with precision():
                ref = live_reference(ref_model, batch, adapter_off=False)
        else:
            with precision():
                ref = live_reference(policy, batch, adapter_off=True)
    if cfg.loss_type.length_normalized:
        n_tok = batch.mask.sum(1).clamp(min=1)  # (2B,)
        logp = logp / n_tok
        ref = ref / n_tok if ref is not None else None
    return preference_loss(cfg, logp, ref)


@torch.no_grad()
def heldout_metrics(
    cfg: Config,
    policy: torch.nn.Module,
    items: list[dict[str, Any]],
    pad_id: int,
    ref_model: Any,
    precision: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, float]:
    """Loss and reward metrics over held-out pairs, weighted by batch size."""
    was_training = policy.training
    policy.eval()
    sums: dict[str, float] = {}
    for s in range(0, len(items), cfg.eval_batch_size):
        chunk = items[s : s + cfg.eval_batch_size]
        _, m = micro_batch_loss(cfg, policy, chunk, pad_id, ref_model, precision)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
    policy.train(was_training)
    return {f"eval/{k}": v / len(items) for k, v in sums.items()}


def task_eval(cfg: Config, model: Any, tok: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Mean task reward and task metrics of samples on cfg.eval.split (seeded, RNG restored),
    sampled with cfg.tools; with tools each sample lists its calls ("tool_calls")."""
    from posttrain.rollout import generate
    from posttrain.tasks import columns, load_task

    task = load_task(cfg.task)
    tools = Toolbox.from_config(cfg.tools)
    rows = task.rows(cfg.eval.split)[: cfg.eval_limit]
    gen = task.generation()
    if cfg.eval.max_new_tokens:
        gen.max_new_tokens = cfg.eval.max_new_tokens
    batch = columns(rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed + 1)
        ro = generate(model, tok, batch["prompt"], gen, tools=tools)
    rewards = torch.as_tensor(task.reward(batch["prompt"], ro.completions, batch)).float()
    summary, _ = task.evaluate(ro.completions, batch)
    samples = [
        {"prompt": p, "completion": c, "reward": float(r)}
        for p, c, r in zip(batch["prompt"], ro.completions, rewards)
    ]
    if tools is not None:
        for i, sample in enumerate(samples):
            sample["tool_calls"] = ro.tool_records(i)
    return {"task/reward": float(rewards.mean()), **{f"task/{k}": v for k, v in summary.items()}}, (
        samples
    )


# ---------------------------------------------------------------------------------------------
# Training


def train(cfg: Config) -> Path:
    """One DPO run; returns its run directory."""
    from posttrain.models import frozen_copy
    from posttrain.runs import write_trained_format
    from posttrain.train import load_policy, start

    acc, run = start(cfg, "dpo")
    policy, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    tools = Toolbox.from_config(cfg.tools)
    train_recs, eval_recs = pair_records(cfg, run.path, policy, tok, tools)
    if cfg.build.only:
        print(f"pairs written to {run.path / 'pairs.jsonl'}")
        return run.path
    train_items, counts = tokenize_pairs(tok, train_recs, cfg.data, tools=tools)
    eval_items = tokenize_pairs(tok, eval_recs, cfg.data, tools=tools)[0] if eval_recs else []
    if counts:
        print(f"preference data: {dict(counts)}", flush=True)
    run.write_json(
        "data_stats.json", {"train": len(train_items), "eval": len(eval_items), **counts}
    )
    pad = tok.pad_token_id

    # Reference: cached log-probs of the starting policy (re-read on resume), a copy, or LoRA off.
    ref_model = None
    if cfg.loss_type.needs_reference and cfg.reference == "precomputed":
        cache = run.path / "reference_logps.json"
        if not cache.is_file() and cfg.reference_cache:
            shutil.copyfile(cfg.reference_cache, cache)
        # Only the main process computes and writes the cache; the others wait, then read it.
        if acc.is_main_process and not cache.is_file():
            t0 = time.perf_counter()
            with acc.autocast():  # the policy's precision: log pi - log ref is 0 at the start
                refs = {
                    "train": precompute_reference(policy, train_items, pad, cfg.eval_batch_size),
                    "eval": precompute_reference(policy, eval_items, pad, cfg.eval_batch_size),
                }
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(refs))
            tmp.replace(cache)
            print(f"reference log-probs cached ({time.perf_counter() - t0:.1f}s)", flush=True)
        acc.wait_for_everyone()
        refs = json.loads(cache.read_text())
        for items, key in ((train_items, "train"), (eval_items, "eval")):
            if len(refs[key]) != len(items):
                raise ConfigError(
                    f"{cache} holds {len(refs[key])} {key} pairs but the data has {len(items)}: "
                    "it was computed on other data; drop --reference_cache"
                )
            for it, ref in zip(items, refs[key]):
                it["ref"] = ref
    elif cfg.loss_type.needs_reference and cfg.reference == "frozen_copy":
        ref_model = frozen_copy(policy)

    if cfg.eval.enabled and cfg.eval.before and not cfg.run.resume:
        with acc.autocast():  # the precision training runs in
            summary, samples = task_eval(cfg, policy, tok)
        run.log(0, summary)
        run.eval_record(0, summary, samples)
        run.samples(0, samples[:16])

    def loss(policy: Any, items: list[dict[str, Any]], normaliser: torch.Tensor):
        mean, metrics = micro_batch_loss(cfg, policy, items, pad, ref_model, acc.autocast)
        return share(mean, metrics, len(items), normaliser)

    def evaluate(policy: Any) -> dict[str, float]:
        return heldout_metrics(cfg, policy, eval_items, pad, ref_model, acc.autocast)

    out = fit(acc, run, policy, train_items, Objective(collate=list, units=len, loss=loss),
              cfg.optim, batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
              eval_every=cfg.eval_every, evaluate=evaluate if eval_items else None,
              resume=bool(cfg.run.resume))  # fmt: skip
    policy, step = out.model, out.step
    if out.interrupted:
        print(f"stopped at step {step}; resume with --run.resume={run.path}")
        return run.path
    final: dict[str, float] = {}
    if eval_items:
        final.update(evaluate(policy))
    if cfg.eval.enabled:
        summary, samples = task_eval(cfg, policy, tok)
        final.update(summary)
        run.eval_record(step, summary, samples)
        run.samples(step, samples[:16])
    if final:
        run.log(step, final)
    if not run.is_main:  # one process writes the folder
        run.close()
        return run.path
    model = acc.unwrap_model(policy)
    model.save_pretrained(run.path / "final")
    tok.save_pretrained(run.path / "final")
    write_trained_format(
        run.path / "final",
        "dpo",
        task=cfg.task if cfg.build.enabled else None,  # pairs.jsonl's prompts are the task's
        strategy=cfg.task.strategy if cfg.build.enabled else None,
        chat=cfg.data.chat,
        system_prompt=cfg.data.system_prompt,
        tools=cfg.tools,
    )
    run.close()
    return run.path


@uses_run_settings
def main(cfg: Config) -> int:
    if cfg.sweep.betas:
        from posttrain.algos.dpo_sweep import sweep

        sweep(cfg)
    else:
        train(cfg)
    return 0
