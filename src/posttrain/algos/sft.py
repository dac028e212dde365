"""Supervised fine-tuning (full weights or LoRA) with the loss on completion tokens only.

Data is a table (file or hub dataset) of prompt/completion pairs, chat conversations or plain text,
or the rows of a task turned into prompt -> completion text by two templates (`data.load_rows`,
`data.encode_rows`). The shipped recipe trains unit conversion to answer directly: "How many grams
are there per 6 kg?" -> " <answer>6000</answer>" (no chat template: the `direct` prompt that
`posttrain eval --strategy direct` asks).

    posttrain sft --config configs/sft_unit_conversion.toml
    posttrain sft --model default --data.source pairs.jsonl --lora.enabled=true

Departures from a plain Trainer: the loss of one optimizer step is the sum of token losses over all
its micro-batches divided by the number of label tokens in the whole step (`sft_loss` with a fixed
`normaliser`), so batch 1 x accumulation 4 gives exactly the gradient of batch 4 x accumulation 1.
The loop, its data cursor and its resume are `offline.fit`'s, with the objective
`offline.supervised(sft_step_loss)`, which `posttrain rft` trains with too (`posttrain distill`
brings its own loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from posttrain.config import LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.data import IGNORE_INDEX, DataConfig, encode_rows, load_rows
from posttrain.offline import (
    TrainConfig,
    finish,
    fit,
    supervised,
    test_eval,
    trained_format,
    validation,
)
from posttrain.tasks.base import TaskConfig
from posttrain.tools import Toolbox, ToolConfig
from posttrain.train import uses_run_settings


def _lora() -> LoraConfig:
    # r=8 on every linear layer of SmolLM2-135M is ~10 MB: under the 20 MB an adapter may take
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
    t = cfg.train
    pad = tok.pad_token_id
    validate = validation(val_set, pad, t.eval_batch_size, acc.device, sft_step_loss)
    out = fit(acc, run, model, train_set, supervised(acc.device, pad, sft_step_loss), cfg.optim,
              batch_size=t.batch_size, epochs=t.epochs, max_steps=t.max_steps,
              eval_every=t.eval_every, evaluate=validate, resume=bool(cfg.run.resume))  # fmt: skip
    model = acc.unwrap_model(out.model)
    if out.interrupted:
        print(f"stopped; resume with --run.resume {run.path}", flush=True)
        return 130
    summary = {"steps": out.total, "train_examples": len(train_set)}
    summary["train_loss"] = out.last.get("loss")
    if validate:
        summary.update(final := validate(model))
        run.log(out.step, final)
    if cfg.eval_limit and cfg.data.source is None and fmt == "template":
        test_eval(run, model, tok, cfg, cfg.data.prompt_template, summary)
    finish(run, model, tok, cfg, summary, trained_format("sft", cfg.data, fmt, cfg.task, cfg.tools))
    run.close()
    return 0
