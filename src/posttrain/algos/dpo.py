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
import copy
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
from posttrain.ops import masked_sum, selective_log_softmax
from posttrain.preferences import (
    BuildConfig,
    PairBatch,
    PairsConfig,
    collate_pairs,
    pair_records,
    step_micro_batches,
    steps_per_epoch,
    task_chat,
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
    size: int = check(64, ">= 1")
    """prompts evaluated"""
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
    rows = task.rows(cfg.eval.split)[: cfg.eval.size]
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
    from posttrain.train import (
        StopOnInterrupt,
        build_optimizer,
        build_scheduler,
        clip_and_step,
        load_policy,
        start,
    )

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

    # batch_size is per process: a micro-batch holds batch_size x processes pairs, and each
    # process takes its own slice of it (DDP averages the gradients of equal-sized slices).
    micro, accum, world = cfg.batch_size, cfg.optim.grad_accum, acc.num_processes
    spe = steps_per_epoch(len(train_items), micro * world, accum)
    total = cfg.max_steps or cfg.epochs * spe
    opt = build_optimizer(policy, cfg.optim)
    sched = build_scheduler(opt, cfg.optim, total)
    policy, opt = acc.prepare(policy, opt)
    state: dict[str, Any] = {}
    if cfg.run.resume:
        state = run.load_checkpoint({"policy": acc.unwrap_model(policy)}, opt, sched)
    elif cfg.eval.enabled and cfg.eval.before:
        summary, samples = task_eval(cfg, policy, tok)
        run.log(0, summary)
        run.eval_record(0, summary, samples)
        run.samples(0, samples[:16])

    def save(step: int) -> None:
        cursor = {"epoch": step // spe, "batch_in_epoch": step % spe}
        run.save_checkpoint(step, {"policy": acc.unwrap_model(policy)}, opt, sched, cursor)

    step = state.get("step", 0)
    with StopOnInterrupt() as stop:
        while step < total and not stop.requested:
            t0 = time.perf_counter()
            lr = sched.get_last_lr()[0]
            sums: dict[str, float] = {}
            batches = step_micro_batches(step, len(train_items), micro * world, accum, cfg.run.seed)
            for j, idx in enumerate(batches):
                mine = idx[acc.process_index :: world]
                sync = contextlib.nullcontext() if j == accum - 1 else acc.no_sync(policy)
                with sync:
                    loss, m = micro_batch_loss(
                        cfg, policy, [train_items[i] for i in mine], pad, ref_model, acc.autocast
                    )
                    acc.backward(loss / accum)  # equal micro-batches: mean of means = batch mean
                for k, v in m.items():
                    v = torch.as_tensor(v, dtype=torch.float32, device=acc.device)
                    v = acc.reduce(v, reduction="mean") if world > 1 else v
                    sums[k] = sums.get(k, 0.0) + float(v) / accum
            grad_norm = clip_and_step(acc, policy, opt, sched, cfg.optim.max_grad_norm)
            step += 1
            row = {**sums, "lr": lr, "grad_norm": grad_norm, "epoch": step / spe}
            row["seconds"] = time.perf_counter() - t0
            if eval_items and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                row.update(heldout_metrics(cfg, policy, eval_items, pad, ref_model, acc.autocast))
            if step % cfg.run.log_every == 0 or step == total:
                run.log(step, row)
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                save(step)
    save(step)
    if stop.requested:
        print(f"stopped at step {step}; resume with --run.resume={run.path}")
        return run.path
    final: dict[str, float] = {}
    if eval_items:
        final.update(heldout_metrics(cfg, policy, eval_items, pad, ref_model, acc.autocast))
    if cfg.eval.enabled:
        summary, samples = task_eval(cfg, policy, tok)
        final.update(summary)
        run.eval_record(step, summary, samples)
        run.samples(step, samples[:16])
    if final:
        run.log(step, final)
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


def sweep(cfg: Config) -> Path:
    """One run per beta into OUT/<name>/beta_<b>, then beta_sweep.png and sweep.json."""
    from posttrain.runs import read_jsonl

    root = Path(cfg.run.out_dir) / (cfg.run.name or f"dpo-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(cfg)
    base.sweep.betas = []
    base.run.out_dir = str(root)
    if base.build.enabled:  # sample the pairs once, train every beta on the same file
        b = copy.deepcopy(base)
        b.build.only, b.run.name, b.eval.enabled = True, "pairs", False
        base.data.source = str(train(b) / "pairs.jsonl")
        base.data.chat = base.data.chat or task_chat(base.task)
        base.build.enabled = False
    curves: dict[float, list[dict[str, Any]]] = {}
    for beta in cfg.sweep.betas:
        sub = copy.deepcopy(base)
        sub.beta, sub.run.name = beta, f"beta_{beta:g}"
        path = train(sub)
        curves[beta] = read_jsonl(path / "metrics.jsonl")
        # Later betas start from the same policy on the same pairs: reuse the first run's reference
        # log-probs and its before-training evaluation.
        if (path / "reference_logps.json").is_file():
            base.reference_cache = str(path / "reference_logps.json")
        base.eval.before = False
    summary: dict[str, Any] = {str(b): _final(rows) for b, rows in curves.items()}
    before = [
        r["task/reward"]
        for r in next(iter(curves.values()))
        if r["step"] == 0 and "task/reward" in r
    ]
    if before:
        summary["task/reward_before"] = before[0]
    (root / "sweep.json").write_text(json.dumps(summary, indent=1))
    plot_sweep(curves, root / "beta_sweep.png")
    print(f"beta sweep: {json.dumps(summary)}\nplot: {root / 'beta_sweep.png'}")
    return root


def _final(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("loss", "rewards/accuracy", "rewards/margin", "eval/loss", "eval/rewards/accuracy")
    out: dict[str, Any] = {}
    for r in rows:
        out.update({k: r[k] for k in (*keys, "task/reward") if k in r and r["step"] > 0})
    return out


def plot_sweep(curves: dict[float, list[dict[str, Any]]], path: Path) -> None:
    """Training loss (and held-out loss when logged) per beta on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for beta, rows in curves.items():
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"beta={beta:g} train")[0]
        ev = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"beta={beta:g} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss")
    ax.set_title("DPO loss by beta")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@uses_run_settings
def main(cfg: Config) -> int:
    if cfg.sweep.betas:
        sweep(cfg)
    else:
        train(cfg)
    return 0
