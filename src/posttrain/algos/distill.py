"""Knowledge distillation: a student learns a teacher's token distributions (Hinton et al. 2015).

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(teacher_T || student_T)

on the completion tokens of supervised data (the same data sources as `posttrain sft`), with
softmax temperature T on both models for the KL term and T = 1 for the cross-entropy. The T^2
factor keeps the KL gradient on the same scale as the cross-entropy's when T changes. `kl =
"reverse"` uses KL(student_T || teacher_T) instead (mode-seeking, as in MiniLLM-style distillation).
Teacher and student must share a tokenizer: the loss compares distributions over the same ids.

    posttrain distill --config configs/distill.toml
    posttrain distill --model default --teacher.name runs/rft-.../final --lora.enabled=true

The training loop is `offline.fit` on sft's data (`data.load_rows`, `data.encode_rows`); only the
per-batch loss differs (the held-out `eval_loss` is the student's cross-entropy, as in sft). With `[tools]` (`--tool
calculator`), tool results in the data's completions get label -100, so neither the cross-entropy
nor the KL term is taken there; the teacher's forward pass still reads them (they are context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from posttrain.algos.sft import sft_step_loss
from posttrain.config import ConfigError, LoraConfig, ModelConfig, OptimConfig, RunConfig, check
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


def _optim() -> OptimConfig:
    return OptimConfig(lr=5e-4, warmup_steps=10, schedule="cosine")


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "teacher": "teacher.name",
        "resume": "run.resume",
        "tool": "tools.names",
    }
    weight: float = check(0.5, "in [0, 1]")
    """w: share of the KL term; 0 is plain SFT, 1 is pure distillation"""
    temperature: float = check(2.0, "> 0")
    """T: softmax temperature of teacher and student in the KL term"""
    kl: Literal["forward", "reverse"] = "forward"
    """forward: KL(teacher || student) (mean-seeking); reverse: KL(student || teacher)"""
    eval_limit: int = check(200, ">= 0")
    """after training, greedy accuracy on this many test rows of the task (0: off; task data only)"""
    eval_max_new_tokens: int = check(32, ">= 1")
    """tokens generated per test question for that accuracy"""
    output: str | None = None
    """also copy the final hub-ready folder here"""
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(enabled=True, r=8, alpha=32))
    optim: OptimConfig = field(default_factory=_optim)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    weight: float,
    temperature: float,
    kl: str = "forward",
    normaliser: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1 - w) * CE + w * T^2 * KL over label tokens, each summed and divided by `normaliser`.

    student_logits, teacher_logits (B, L, V); labels (B, L) with -100 where no loss is taken;
    position t predicts label t + 1. normaliser defaults to the number of label tokens.
    """
    target = labels[:, 1:]  # (B, L-1)
    mask = (target != IGNORE_INDEX).float()
    s = student_logits[:, :-1].float()  # (B, L-1, V)
    t = teacher_logits[:, :-1].float()
    ce_tok = F.cross_entropy(s.flatten(0, 1), target.clamp(min=0).flatten(), reduction="none")
    ce_tok = ce_tok.view_as(mask)
    log_s = F.log_softmax(s / temperature, dim=-1)
    log_t = F.log_softmax(t / temperature, dim=-1)
    if kl == "forward":
        kl_tok = (log_t.exp() * (log_t - log_s)).sum(-1)  # KL(teacher || student), (B, L-1)
    elif kl == "reverse":
        kl_tok = (log_s.exp() * (log_s - log_t)).sum(-1)  # KL(student || teacher)
    else:
        raise ValueError(f"unknown kl {kl!r}; use forward or reverse")
    tokens = mask.sum()
    denom = tokens.clamp(min=1) if normaliser is None else normaliser
    ce = (ce_tok * mask).sum() / denom
    kd = (kl_tok * mask).sum() / denom
    loss = (1 - weight) * ce + weight * temperature**2 * kd
    return loss, {
        "ce": ce.detach(),
        "kl": kd.detach(),
        "nll_sum": (ce_tok * mask).sum().detach(),
        "tokens": tokens.detach(),
    }


def check_tokenizers(student_tok: Any, teacher_tok: Any, student: str, teacher: str) -> int:
    """The shared vocabulary size, or a ConfigError when the tokenizers differ."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        differ = len(set(sv.items()) ^ set(tv.items()))
        raise ConfigError(
            f"teacher {teacher!r} and student {student!r} do not share a tokenizer "
            f"({len(tv)} vs {len(sv)} tokens, {differ} token ids differ). Distillation compares "
            "distributions over the same token ids: pick a teacher and student of one model family "
            "(e.g. SmolLM2-360M-Instruct -> SmolLM2-135M-Instruct)."
        )
    return len(sv)


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.models import load_model
    from posttrain.train import load_policy, start

    acc, run = start(cfg, "distill")
    model, tok = load_policy(cfg.model, cfg.lora, acc.device, onednn=cfg.run.onednn)
    teacher, teacher_tok = load_model(cfg.teacher, device=str(acc.device))  # torch's kernels
    teacher.requires_grad_(False)
    vocab = check_tokenizers(tok, teacher_tok, cfg.model.name, cfg.teacher.name)
    train_rows, val_rows, fmt = load_rows(cfg)
    tools = Toolbox.from_config(cfg.tools)
    train_set = encode_rows(train_rows, tok, cfg.data, fmt, tools)
    val_set = encode_rows(val_rows, tok, cfg.data, fmt, tools)

    def loss_fn(model: Any, batch: dict[str, torch.Tensor], normaliser: Any):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            t_logits = teacher(**inputs).logits[..., :vocab]  # (B, L, V): drop padded head rows
        s_logits = model(**inputs).logits[..., :vocab]
        return distill_loss(
            s_logits,
            t_logits,
            batch["labels"],
            weight=cfg.weight,
            temperature=cfg.temperature,
            kl=cfg.kl,
            normaliser=normaliser,
        )

    t, pad = cfg.train, tok.pad_token_id
    validate = validation(val_set, pad, t.eval_batch_size, acc.device, sft_step_loss)  # plain CE
    out = fit(acc, run, model, train_set, supervised(acc.device, pad, loss_fn), cfg.optim,
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
    trained = trained_format("distill", cfg.data, fmt, cfg.task, cfg.tools)
    finish(run, model, tok, cfg, summary, trained)
    run.close()
    return 0
