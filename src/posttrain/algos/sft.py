"""Supervised fine-tuning (full weights or LoRA) with the loss on completion tokens only.

Data is a table (file or hub dataset) of prompt/completion pairs, chat conversations or plain text,
or the rows of a task turned into prompt -> completion text by two templates. The shipped recipe
trains unit conversion to answer directly: "How many grams are there per 6 kg?" ->
" <answer>6000</answer>" (no chat template, as in the course homework).

    posttrain sft --config configs/sft_unit_conversion.toml
    posttrain sft --model default --data.source pairs.jsonl --lora.enabled=true

Departures from a plain Trainer: the loss of one optimizer step is the sum of token losses over all
its micro-batches divided by the number of label tokens in the whole step (`sft_loss` with a fixed
`normaliser`), so batch 1 x accumulation 4 gives exactly the gradient of batch 4 x accumulation 1.
The data order is a function of (seed, epoch), so `--run.resume` continues with the same batches.
`fit` is the training loop; `posttrain rft` and `posttrain distill` reuse it with their own data or
loss.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from posttrain.config import (
    ConfigError,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    check,
    to_toml,
)
from posttrain.data import IGNORE_INDEX, collate_sft
from posttrain.tasks.base import TaskConfig
from posttrain.tools import Toolbox, ToolConfig
from posttrain.train import uses_run_settings


@dataclass
class DataConfig:
    source: str | None = None
    """a .csv/.json/.jsonl/.parquet/.pkl file or hub dataset; unset: the rows of the [task]"""
    subset: str | None = None
    """hub dataset config name"""
    split: str = "train"
    """split to train on"""
    validation_split: str | None = None
    """split for the eval loss; unset: hold out validation_size rows of the train split"""
    validation_size: float = check(0.05, ">= 0")
    """rows held out for the eval loss when there is no validation split (< 1: a fraction)"""
    format: Literal["auto", "prompt_completion", "messages", "text", "template"] = "auto"
    """how rows become text; auto: messages, else prompt+completion, else text, else template"""
    prompt_column: str = "prompt"
    """column holding the prompt (prompt_completion format)"""
    completion_column: str = "completion"
    """column holding the completion (prompt_completion format)"""
    messages_column: str = "messages"
    """column holding a list of {role, content} messages (messages format, chat template)"""
    text_column: str = "text"
    """column holding plain text (text format: every token is trained)"""
    prompt_template: str = "{question} "
    """template format: the prompt, with {field} filled from the row (numbers shortened); the
    default is prompting's `direct` prompt, so `posttrain eval --strategy direct` matches it"""
    completion_template: str = "<answer>{answer}</answer>"
    """template format: the completion; EOS is appended"""
    max_length: int = check(256, ">= 1")
    """examples longer than this many tokens are cut at the end"""
    limit: int = check(0, ">= 0")
    """use only the first N training rows (0: all)"""


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


def _lora() -> LoraConfig:
    # r=8 on every linear layer of SmolLM2-135M is ~10 MB (the seed asks < 20 MB)
    return LoraConfig(enabled=True, r=8, alpha=32)


def _optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, warmup_steps=10, schedule="cosine")


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "adapter": "model.adapter",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    eval_limit: int = check(200, ">= 0")
    """after training, greedy accuracy on this many test rows of the task (0: off; task data only)"""
    eval_max_new_tokens: int = check(32, ">= 1")
    """tokens generated per test question for that accuracy"""
    output: str | None = None
    """also copy the final hub-ready folder here"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=_lora)
    optim: OptimConfig = field(default_factory=_optim)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)


# ---------------------------------------------------------------------------------------------
# The loss


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, normaliser: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked next-token cross-entropy: sum of -log p(label) over label tokens / normaliser.

    logits (B, L, V), labels (B, L) with -100 where no loss is taken; position t predicts label
    t + 1. normaliser defaults to this batch's label-token count (token mean); pass the count of
    the whole optimizer step to make gradient accumulation exact.
    """
    target = labels[:, 1:]  # (B, L-1)
    mask = target != IGNORE_INDEX
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.clamp(min=0).flatten(), reduction="none"
    ).view_as(target)
    nll_sum = (nll * mask).sum()
    tokens = mask.sum()
    denom = tokens.clamp(min=1) if normaliser is None else normaliser
    return nll_sum / denom, {"nll_sum": nll_sum.detach(), "tokens": tokens}


def label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that carry a loss (labels shifted by one, as in sft_loss)."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


# (model, batch, normaliser) -> (loss, metrics with "nll_sum" and "tokens")
LossFn = Callable[[Any, dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def sft_step_loss(
    model: Any, batch: dict[str, torch.Tensor], normaliser: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    # The output head runs only from the first column whose next token carries a label (prompts
    # come first in every row): on unit conversion that skips ~70 % of the (B, L, V) logits.
    labels = batch["labels"]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(0)  # (L-1,)
    first = int(labelled.int().argmax()) if bool(labelled.any()) else labels.shape[1] - 1
    keep = labels.shape[1] - first
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep
    )
    return sft_loss(out.logits, labels[:, first:], normaliser=normaliser)


def accumulate(
    acc: Any, model: Any, micro_batches: list[dict[str, torch.Tensor]], loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """Forward and backward every micro-batch of one optimizer step (no optimizer step).

    Each micro-batch's loss is divided by the label tokens of the whole step (summed over
    processes, times the process count because DDP averages gradients), so the summed gradient is
    the token mean over the step however it is split.
    """
    tokens = sum(label_tokens(mb) for mb in micro_batches)
    tokens = torch.as_tensor(tokens, device=acc.device, dtype=torch.float32)
    if acc.num_processes > 1:
        tokens = acc.reduce(tokens, reduction="sum")
    normaliser = tokens.clamp(min=1) / acc.num_processes
    out: dict[str, torch.Tensor] = {}
    for j, mb in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        with contextlib.nullcontext() if last else acc.no_sync(model):
            loss, metrics = loss_fn(model, mb, normaliser)
            acc.backward(loss)
        metrics = {"loss": loss.detach(), **metrics}
        for k, v in metrics.items():
            out[k] = out.get(k, 0) + v.detach()
    if acc.num_processes > 1:  # the step's loss over every process; counts summed
        out = {
            k: acc.reduce(
                torch.as_tensor(v, device=acc.device, dtype=torch.float32),
                reduction="mean" if k == "loss" else "sum",
            )
            for k, v in out.items()
        }
    return out


# ---------------------------------------------------------------------------------------------
# Data


def _values(row: dict[str, Any]) -> dict[str, Any]:
    from posttrain.data import format_number

    return {k: format_number(v) if isinstance(v, int | float) else v for k, v in row.items()}


def with_question(row: dict[str, Any]) -> dict[str, Any]:
    """The row with a `question`: its text `prompt` when it has none (sentiment's review openings),
    so that question templates work on every task."""
    if "question" in row or not isinstance(row.get("prompt"), str):
        return row
    return {**row, "question": row["prompt"]}


def fill(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format(**_values(row))
    except KeyError as e:
        raise ConfigError(
            f"template {template!r} names the field {e}, which the rows do not have; "
            f"their fields are {', '.join(row)}"
        ) from None


def pick_format(cfg: DataConfig, columns: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_column in columns:
        return "messages"
    if cfg.prompt_column in columns and cfg.completion_column in columns:
        return "prompt_completion"
    if cfg.text_column in columns:
        return "text"
    return "template"


def encode_rows(
    rows: list[dict[str, Any]], tok: Any, cfg: DataConfig, fmt: str, tools: Toolbox | None = None
) -> list[dict[str, Any]]:
    """Rows -> encoded examples ({input_ids, labels}); rows left with no label token are dropped.
    With `tools`, the tool results in completions get label -100."""
    from posttrain.data import encode_messages, encode_prompt_completion, encode_text

    out = []
    for i, row in enumerate(rows):
        if fmt == "messages":
            ex = encode_messages(
                tok, row[cfg.messages_column], max_length=cfg.max_length, tools=tools
            )
        elif fmt == "prompt_completion":
            p, c = row[cfg.prompt_column], row[cfg.completion_column]
            if not isinstance(p, str) or not isinstance(c, str):
                raise ConfigError(f"row {i}: prompt and completion must be text, got {p!r}, {c!r}")
            ex = encode_prompt_completion(tok, p, c, max_length=cfg.max_length, tools=tools)
        elif fmt == "text":
            ex = encode_text(tok, str(row[cfg.text_column]), max_length=cfg.max_length, tools=tools)
        else:
            ex = encode_prompt_completion(
                tok,
                fill(cfg.prompt_template, row),
                fill(cfg.completion_template, row),
                max_length=cfg.max_length,
                tools=tools,
            )
        if any(x != IGNORE_INDEX for x in ex["labels"][1:]):
            out.append(ex)
    if rows and not out:
        raise ConfigError(
            f"every example lost its completion to truncation at data.max_length={cfg.max_length}; "
            "raise data.max_length"
        )
    return out


def _required(cfg: DataConfig, fmt: str) -> list[str]:
    return {
        "messages": [cfg.messages_column],
        "prompt_completion": [cfg.prompt_column, cfg.completion_column],
        "text": [cfg.text_column],
    }.get(fmt, [])


def load_rows(cfg: Config) -> tuple[list[dict], list[dict], str]:
    """(train rows, validation rows, format) from the data source or the task."""
    d = cfg.data
    if d.source is None:
        from posttrain.tasks import load_task

        task = load_task(cfg.task)
        train, val = task.rows("train"), task.rows("validation")
        fmt = "template" if d.format == "auto" else d.format
    else:
        from posttrain.data import load_table, require_columns

        table = load_table(d.source, d.split, d.subset)
        fmt = pick_format(d, table.column_names)
        require_columns(table, _required(d, fmt), d.source)
        train = table.to_list()
        if d.validation_split:
            val = load_table(d.source, d.validation_split, d.subset).to_list()
        else:
            n_val = (
                int(d.validation_size * len(train))
                if d.validation_size < 1
                else int(d.validation_size)
            )
            if d.validation_size > 0 and len(train) > 1:
                n_val = max(n_val, 1)
            n_val = min(n_val, len(train) - 1)
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(cfg.run.seed)
            )
            val = [train[i] for i in order[:n_val].tolist()]
            train = [train[i] for i in order[n_val:].tolist()]
    if d.limit:
        train = train[: d.limit]
    if not train:
        raise ConfigError("no training rows (check data.source, data.split and data.limit)")
    return train, val, fmt


# ---------------------------------------------------------------------------------------------
# The training loop (shared with rft and distill)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def eval_loss(
    model: Any, examples: list[dict], pad_id: int, batch_size: int, device: torch.device
) -> float:
    """Token-mean cross-entropy of the completion tokens of `examples`."""
    was = model.training
    model.eval()
    nll, n = 0.0, 0
    for s in range(0, len(examples), batch_size):
        batch = _to(collate_sft(examples[s : s + batch_size], pad_id), device)
        _, m = sft_step_loss(model, batch, None)
        nll += float(m["nll_sum"])
        n += int(m["tokens"])
    model.train(was)
    return nll / max(n, 1)


def fit(
    acc: Any,
    run: Any,
    model: Any,
    tok: Any,
    train_set: list[dict],
    val_set: list[dict],
    tcfg: TrainConfig,
    ocfg: OptimConfig,
    *,
    loss_fn: LossFn = sft_step_loss,
    resume: bool = False,
    step_offset: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Train on encoded examples; -> (prepared model, summary). Checkpoints and resumes itself."""
    from posttrain.train import StopOnInterrupt, build_optimizer, build_scheduler, clip_and_step

    # batch_size is per process: a step reads batch_size x grad_accum x processes examples
    per_step = tcfg.batch_size * ocfg.grad_accum * acc.num_processes
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total = tcfg.max_steps or tcfg.epochs * steps_per_epoch
    seed = run.rcfg.seed
    opt = build_optimizer(model, ocfg)
    sched = build_scheduler(opt, ocfg, total)
    state: dict[str, Any] = {}
    if resume:
        try:
            state = run.load_checkpoint({"policy": model}, opt, sched)
        except FileNotFoundError as e:
            raise ConfigError(f"--run.resume: {e}; start a new run instead") from None
        print(f"resumed from step {state['step']}", flush=True)
    model, opt = acc.prepare(model, opt)
    model.train()
    pad = tok.pad_token_id
    summary: dict[str, Any] = {"steps": total, "train_examples": len(train_set)}

    def batches_for(step: int) -> list[dict[str, torch.Tensor]]:
        # the data cursor is a function of (seed, step): resume replays the same order
        epoch, i = divmod(step - 1, steps_per_epoch)
        order = torch.randperm(
            len(train_set), generator=torch.Generator().manual_seed(seed + epoch)
        )
        idx = order[i * per_step : (i + 1) * per_step].tolist()
        idx = idx[acc.process_index :: acc.num_processes]  # each process takes its share
        chunks = [idx[s : s + tcfg.batch_size] for s in range(0, len(idx), tcfg.batch_size)]
        return [_to(collate_sft([train_set[j] for j in c], pad), acc.device) for c in chunks]

    def do_eval(step: int) -> None:
        if val_set:
            loss = eval_loss(model, val_set, pad, tcfg.eval_batch_size, acc.device)
            run.log(step_offset + step, {"eval_loss": loss})
            summary["eval_loss"] = loss

    step = int(state.get("step", step_offset)) - step_offset
    with StopOnInterrupt() as stop:
        while step < total:
            step += 1
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            m = accumulate(acc, model, batches_for(step), loss_fn)
            grad_norm = clip_and_step(acc, model, opt, sched, ocfg.max_grad_norm)
            rec = {k: v for k, v in m.items() if k not in ("nll_sum",)}
            rec.update(lr=lr, grad_norm=grad_norm, epoch=(step - 1) / steps_per_epoch)
            rec["seconds"] = time.perf_counter() - t0
            if step % run.rcfg.log_every == 0 or step == total:
                run.log(step_offset + step, rec)
            summary["train_loss"] = float(m["loss"])
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < total:
                do_eval(step)
            save_now = run.rcfg.save_every and step % run.rcfg.save_every == 0
            if save_now or stop.requested or step == total:
                run.save_checkpoint(
                    step_offset + step,
                    {"policy": acc.unwrap_model(model)},
                    opt,
                    sched,
                    {"epoch": (step - 1) // steps_per_epoch, "data_seed": seed},
                )
            if stop.requested:
                summary["interrupted"] = True
                return model, summary
    do_eval(step)
    return model, summary


# ---------------------------------------------------------------------------------------------
# Task accuracy and the hub-ready folder


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
    the tools of cfg.tools."""
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


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.train import load_policy, start

    acc, run = start(cfg, "sft")
    model, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    train_rows, val_rows, fmt = load_rows(cfg)
    tools = Toolbox.from_config(cfg.tools)
    train_set = encode_rows(train_rows, tok, cfg.data, fmt, tools)
    val_set = encode_rows(val_rows, tok, cfg.data, fmt, tools)
    cut = sum(e["truncated"] for e in train_set)
    print(
        f"sft: {len(train_set)} train / {len(val_set)} validation examples ({fmt}); "
        f"{cut} cut at {cfg.data.max_length} tokens",
        flush=True,
    )
    model, summary = fit(
        acc, run, model, tok, train_set, val_set, cfg.train, cfg.optim, resume=bool(cfg.run.resume)
    )
    model = acc.unwrap_model(model)
    if summary.get("interrupted"):
        print(f"stopped; resume with --run.resume {run.path}", flush=True)
        return 130
    if cfg.eval_limit and cfg.data.source is None and fmt == "template":
        test_eval(run, model, tok, cfg, cfg.data.prompt_template, summary)
    finish(run, model, tok, cfg, summary, trained_format("sft", cfg.data, fmt, cfg.task, cfg.tools))
    run.close()
    return 0
