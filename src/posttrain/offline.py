"""One training loop for the offline commands: sft, distill, rft, dpo and reward-model.

An algorithm brings its items (encoded examples, tokenized pairs) and an `Objective`: how a
micro-batch is collated, how many loss units it holds (label tokens, pairs) and its loss. `fit`
owns the rest, the same for every command:

1. The data cursor. Epoch e reads the items in the order of a permutation seeded with
   run.seed + e; optimizer step s of the epoch reads the next N = batch_size x grad_accum x
   processes items, each process every processes-th of them, cut into micro-batches of
   batch_size. An epoch has ceil(n / N) steps (the last one short) unless its rest would leave a
   process without an item. The cursor is a function of the step, so --run.resume reads the
   batches the uninterrupted run would have read.
2. Accumulation. A micro-batch's loss is its sum over loss units divided by the units of the
   whole step on every process (over the process count, as DDP averages gradients), so a step's
   gradient is the mean over its units however the step is cut into micro-batches and processes.
3. Gradient sync. DDP all-reduces on a step's last micro-batch only (acc.no_sync on the others).
4. Logging, an optional evaluation every eval_every steps, a checkpoint every run.save_every
   steps and at the end, and Ctrl-C (checkpoint, then stop).

The end of a supervised run (test accuracy on the task, the hub-ready folder) is here too: sft,
distill and rft share it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config import ConfigError, OptimConfig, check
from posttrain.config_text import to_toml
from posttrain.data import IGNORE_INDEX, DataConfig, collate_sft, fill, with_question
from posttrain.tasks.base import TaskConfig
from posttrain.tools import Toolbox, ToolConfig

Metrics = dict[str, torch.Tensor]
# (model, micro-batch, normaliser) -> (loss, metrics): the loss and every metric are sums over
# the micro-batch's loss units divided by normaliser (so they add up over a step's micro-batches)
LossFn = Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Metrics]]


@dataclass
class TrainConfig:
    epochs: int = check(3, ">= 1")
    """passes over the training data"""
    max_steps: int = check(0, ">= 0")
    """optimizer steps (0: epochs x steps per epoch); overrides epochs when set"""
    batch_size: int = check(16, ">= 1")
    """examples per micro-batch on each process; a step sees batch_size x grad_accum x processes"""
    eval_every: int = check(50, ">= 0")
    """eval loss on the validation rows every this many steps (0: only at the end)"""
    eval_batch_size: int = check(32, ">= 1")
    """examples per forward pass for the eval loss"""


@dataclass
class Objective:
    """What an algorithm brings to `fit`."""

    collate: Callable[[list[Any]], Any]
    """items -> one micro-batch, on the device"""
    units: Callable[[Any], Any]
    """loss units in a micro-batch: label tokens (sft), pairs (dpo, reward-model)"""
    loss: LossFn
    count: str | None = None
    """log the step's units on all processes under this name"""


def share(loss: torch.Tensor, metrics: Metrics, n: int, normaliser: torch.Tensor):
    """A loss and metrics that are means over a micro-batch's n units, as their share of the
    step (mean x n / normaliser), for `Objective.loss`."""
    w = n / normaliser
    return loss * w, {k: v * w for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# The data cursor


def steps_per_epoch(n_items: int, per_step: int, processes: int) -> int:
    """ceil(n_items / per_step), less the last short step when it cannot give every process an
    item (DDP needs a backward pass on each)."""
    full, rest = divmod(n_items, per_step)
    steps = full + (rest >= processes)
    if not steps:
        raise ConfigError(f"{n_items} training items are fewer than the {processes} processes")
    return steps


def micro_batches(
    step: int,
    n_items: int,
    *,
    batch_size: int,
    grad_accum: int,
    processes: int,
    rank: int,
    seed: int,
) -> list[list[int]]:
    """Item indices of this process's micro-batches at optimizer step `step` (0-based)."""
    per_step = batch_size * grad_accum * processes
    epoch, i = divmod(step, steps_per_epoch(n_items, per_step, processes))
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch))
    mine = order[i * per_step : (i + 1) * per_step].tolist()[rank::processes]
    return [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]


# ---------------------------------------------------------------------------------------------
# One optimizer step's gradients, and the loop


def accumulate(acc: Any, model: Any, batches: list[Any], objective: Objective) -> Metrics:
    """Forward and backward every micro-batch of one optimizer step (no optimizer step) ->
    the step's loss and metrics over all processes."""
    units = torch.as_tensor(sum(float(objective.units(b)) for b in batches), device=acc.device)
    if acc.num_processes > 1:
        units = acc.reduce(units, reduction="sum")
    normaliser = units.clamp(min=1) / acc.num_processes
    out: Metrics = {}
    for j, batch in enumerate(batches):
        last = j == len(batches) - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            loss, metrics = objective.loss(model, batch, normaliser)
            acc.backward(loss)
        for k, v in {"loss": loss, **metrics}.items():
            out[k] = out.get(k, 0) + v.detach().float()
    if acc.num_processes > 1:  # each process holds its share of the step's mean
        out = {k: acc.reduce(v, reduction="sum") for k, v in out.items()}
        out = {k: v / acc.num_processes for k, v in out.items()}
    if objective.count:
        out[objective.count] = units
    return out


@dataclass
class Trained:
    model: Any
    """the prepared model (acc.unwrap_model gives the plain one)"""
    step: int
    """optimizer steps done, step_offset included"""
    total: int
    """optimizer steps of the whole run, step_offset included"""
    last: dict[str, float]
    """the last step's metrics"""
    interrupted: bool
    """Ctrl-C: checkpointed and stopped early"""


def fit(
    acc: Any,
    run: Any,
    model: Any,
    items: list[Any],
    objective: Objective,
    optim: OptimConfig,
    *,
    batch_size: int,
    epochs: int,
    max_steps: int = 0,
    eval_every: int = 0,
    evaluate: Callable[[Any], dict[str, float]] | None = None,
    module: str = "policy",
    resume: bool = False,
    step_offset: int = 0,
) -> Trained:
    """Train `model` on `items`: optimizer, schedule, accelerate, resume, then the loop.

    evaluate(prepared model) -> metrics logged with the step every eval_every steps (not at the
    last: the caller evaluates at the end). The checkpoint stores the model as `module`. rft trains
    in rounds: step_offset counts the steps of the rounds before, for logs and checkpoints.
    """
    from posttrain.train import StopOnInterrupt, build_optimizer, build_scheduler, clip_and_step

    world, seed = acc.num_processes, run.rcfg.seed
    spe = steps_per_epoch(len(items), batch_size * optim.grad_accum * world, world)
    total = max_steps or epochs * spe
    opt = build_optimizer(model, optim)
    sched = build_scheduler(opt, optim, total)
    model, opt = acc.prepare(model, opt)
    model.train()
    step = 0
    if resume:
        state = run.load_checkpoint({module: acc.unwrap_model(model)}, opt, sched)
        step = int(state["step"]) - step_offset
        print(f"resumed from step {state['step']}", flush=True)

    def save(step: int) -> None:
        cursor = {"epoch": step // spe, "batch_in_epoch": step % spe}
        modules = {module: acc.unwrap_model(model)}
        run.save_checkpoint(step_offset + step, modules, opt, sched, cursor)

    last: dict[str, float] = {}
    saved = step
    with StopOnInterrupt() as stop:
        while step < total and not stop.requested:
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            idx = micro_batches(step, len(items), batch_size=batch_size, processes=world,
                                grad_accum=optim.grad_accum, rank=acc.process_index, seed=seed)  # fmt: skip
            batches = [objective.collate([items[i] for i in mb]) for mb in idx]
            m = accumulate(acc, model, batches, objective)
            grad_norm = clip_and_step(acc, model, opt, sched, optim.max_grad_norm)
            step += 1
            last = {k: float(v) for k, v in m.items()}
            row = {**last, "lr": lr, "grad_norm": grad_norm, "epoch": step / spe}
            row["seconds"] = time.perf_counter() - t0
            evaluated = bool(evaluate and eval_every and step % eval_every == 0 and step < total)
            if evaluated:
                row.update(evaluate(model))
            if step % run.rcfg.log_every == 0 or step == total or evaluated:
                run.log(step_offset + step, row)
            if run.rcfg.save_every and step % run.rcfg.save_every == 0:
                save(saved := step)
    if saved != step or step == 0:
        save(step)
    return Trained(model, step_offset + step, step_offset + total, last, stop.requested)


# ---------------------------------------------------------------------------------------------
# Supervised examples (sft, distill, rft)


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that carry a loss (labels shifted by one, as in sft_loss)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


@torch.no_grad()
def eval_loss(
    model: Any,
    examples: list[dict],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    loss: LossFn,
) -> float:
    """Token mean of `loss` (sft.sft_step_loss: the cross-entropy) over the label tokens of
    `examples`, from its nll_sum and tokens metrics."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = to_device(collate_sft(examples[s : s + batch_size], pad_id), device)
        _, m = loss(model, batch, None)
        nll += float(m["nll_sum"])
        n += int(m["tokens"])
    model.train(was)
    return nll / max(n, 1)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def supervised(device: torch.device, pad_id: int, loss: LossFn) -> Objective:
    """The objective on encoded examples ({input_ids, labels}): the token mean over the step's
    label tokens. `loss` (model, batch, normaliser) -> (loss, metrics): `sft.sft_step_loss`, or
    distill's; its counts (nll_sum, tokens) are left out of the logged metrics, which `fit`
    sums over micro-batches."""

    def step_loss(model: Any, batch: dict, normaliser: Any) -> tuple[torch.Tensor, dict]:
        out, metrics = loss(model, batch, normaliser)
        return out, {k: v for k, v in metrics.items() if k not in ("nll_sum", "tokens")}

    return Objective(
        collate=lambda examples: to_device(collate_sft(examples, pad_id), device),
        units=label_tokens,
        loss=step_loss,
        count="tokens",
    )


def validation(
    examples: list[dict], pad_id: int, batch_size: int, device: torch.device, loss: LossFn
) -> Callable[[Any], dict[str, float]] | None:
    """model -> {"eval_loss": `eval_loss` on `examples`}, fit's `evaluate`; None without any."""
    if not examples:
        return None
    return lambda model: {"eval_loss": eval_loss(model, examples, pad_id, batch_size, device, loss)}


# ---------------------------------------------------------------------------------------------
# The end of a supervised run: task accuracy and the hub-ready folder


def task_accuracy(
    model: Any,
    tok: Any,
    task: Any,
    rows: list[dict],
    prompts: list[str],
    max_new_tokens: int,
    progress: bool = False,
    tools: Toolbox | None = None,
) -> dict[str, float]:
    """Greedy generation on `prompts` (calling `tools`, if any) scored by the task's metrics."""
    from posttrain.rollout import GenerationConfig, generate
    from posttrain.tasks.base import columns

    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=["</answer>"])
    roll = generate(model, tok, prompts, gen, progress=progress, tools=tools)
    summary, _ = task.evaluate(roll.completions, columns(rows))
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}


def test_eval(
    run: Any, model: Any, tok: Any, cfg: Any, prompt_template: str, summary: dict[str, Any]
) -> None:
    """Accuracy on cfg.eval_limit test rows of cfg.task, prompted with `prompt_template`, with
    the tools of cfg.tools; logged at summary["steps"] and kept in summary["test"]."""
    from posttrain.tasks import load_task

    task = load_task(cfg.task)
    rows = [with_question(r) for r in task.rows("test")[: cfg.eval_limit]]
    prompts = [fill(prompt_template, r) for r in rows]
    t0 = time.perf_counter()
    tools = Toolbox.from_config(cfg.tools)
    summary["test"] = task_accuracy(
        model, tok, task, rows, prompts, cfg.eval_max_new_tokens, cfg.run.progress, tools
    )
    summary["test"]["seconds"] = time.perf_counter() - t0
    run.log(summary["steps"], {f"test_{k}": v for k, v in summary["test"].items()})


def trained_format(
    command: str, data: DataConfig, fmt: str, task: TaskConfig, tools: ToolConfig
) -> dict[str, Any]:
    """What `runs.write_trained_format` records for training on `data` in format `fmt`: the task
    when its rows were the data, the `direct` strategy when the prompt template is its prompt."""
    template = fmt == "template"
    return {
        "command": command,
        "task": task if data.source is None else None,
        "strategy": "direct" if template and data.prompt_template == "{question} " else None,
        "prompt_template": data.prompt_template if template else None,
        "chat": fmt == "messages",
        "tools": tools,
    }


def finish(
    run: Any,
    model: Any,
    tok: Any,
    cfg: Any,
    results: dict[str, Any],
    trained: dict[str, Any] | None = None,
) -> Any:
    """Write the hub-ready folder run/final (weights, tokenizer, model card and, given `trained`
    (see `trained_format`), posttrain.json) and log its size."""
    import shutil

    from posttrain.export import save_folder
    from posttrain.models import dir_size_mb, is_peft
    from posttrain.runs import write_trained_format

    folder = run.path / "final"
    save_folder(
        model, tok, folder, base_model=cfg.model.name, config_toml=to_toml(cfg), results=results
    )
    if trained is not None:
        write_trained_format(folder, **trained)
    size = dir_size_mb(folder)
    kind = "adapter" if is_peft(model) else "model"
    results = {**results, f"{kind}_size_mb": size}
    run.write_json("results.json", results)
    print(f"saved the {kind} to {folder} ({size:.2f} MB)", flush=True)
    if cfg.output:
        shutil.copytree(folder, cfg.output, dirs_exist_ok=True)
        print(f"copied to {cfg.output}", flush=True)
    return folder
