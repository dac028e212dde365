"""Reward model training on preference pairs with the Bradley-Terry loss (Ouyang et al. 2022).

A sequence-classification head with one output (num_labels=1) on a causal LM (the head reads the
last token) or an encoder (the head reads the first token) scores prompt + completion text:

    loss = -log sigmoid(r(x, y_w) - r(x, y_l) - margin)

with an optional constant margin (Llama 2 uses per-pair margins). Chosen and rejected go through
the model in one concatenated batch. Full fine-tuning or LoRA (the head is always trained). The
final model is saved as a plain `AutoModelForSequenceClassification` directory (LoRA merged) with
its tokenizer, so the online-RL reward interface loads it by path (`model:RUN/final`). The
held-out pairs' scores go to eval_pairs.jsonl (with the building reward's gap, for built pairs).

    posttrain reward-model --data.source=pairs.jsonl --model default --lora.enabled=true
    posttrain reward-model --config configs/reward_model_sentiment.toml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from posttrain.config import LoraConfig, ModelConfig, OptimConfig, RunConfig, check
from posttrain.models import ModelLoadError
from posttrain.offline import Objective, fit, share
from posttrain.ops import position_ids_from_mask
from posttrain.pair_building import pair_records
from posttrain.preferences import (
    BuildConfig,
    PairsConfig,
    collate_sequences,
    tokenize_pairs,
    write_jsonl,
)
from posttrain.tasks.base import TaskConfig
from posttrain.train import uses_run_settings

Metrics = dict[str, torch.Tensor]


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {"model": "model.name", "data": "data.source"}
    margin: float = 0.0
    """required score gap: loss = -log sigmoid(r_chosen - r_rejected - margin)"""
    epochs: int = check(1, ">= 1")
    """passes over the training pairs"""
    max_steps: int = check(0, ">= 0")
    """stop after this many optimizer steps (0: epochs decide)"""
    batch_size: int = check(8, ">= 1")
    """pairs per micro-batch (2x rows in the forward pass); x optim.grad_accum per step"""
    eval_every: int = check(0, ">= 0")
    """held-out accuracy every this many steps (0: at the end only)"""
    eval_batch_size: int = check(16, ">= 1")
    """pairs per forward pass when evaluating"""
    score_suffix: str = ""
    """text appended to prompt + completion before scoring, e.g. "\nOverall, the review is":
    a causal LM's head reads the last token, and after such a question that token sums up the
    text. Saved with the model (config.posttrain_score_suffix); the model: reward appends it"""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    run: RunConfig = field(default_factory=RunConfig)
    data: PairsConfig = field(default_factory=PairsConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


def bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, *, margin: float = 0.0
) -> tuple[torch.Tensor, Metrics]:
    """-log sigmoid(r_chosen - r_rejected - margin), mean over pairs. Scores (B,).

    accuracy counts pairs with r_chosen > r_rejected (a tie is wrong); margin is the mean gap."""
    gap = r_chosen - r_rejected  # (B,)
    loss = -F.logsigmoid(gap - margin).mean()
    g = gap.detach()
    return loss, {
        "loss": loss.detach(),
        "accuracy": (g > 0).float().mean(),
        "margin": g.mean(),
        "rewards/chosen": r_chosen.detach().mean(),
        "rewards/rejected": r_rejected.detach().mean(),
    }


def is_decoder_head(model: Any) -> bool:
    """Causal-LM classifiers name their head `score` and read the last token; encoders do not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(base, "score")


def load_reward_model(cfg: ModelConfig, lora: LoraConfig, device: torch.device) -> tuple[Any, Any]:
    """A 1-output sequence classifier on top of a causal LM or encoder (+ LoRA), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models import embedded_dir, load_tokenizer, pick_dtype, resolve

    kind, path = resolve(cfg.name)
    if kind in ("gguf", "adapter"):
        raise ModelLoadError(
            f"reward models start from a model directory or hub id, not "
            f"{'a GGUF file' if kind == 'gguf' else 'a LoRA adapter'} ({cfg.name!r}); "
            "merge the adapter first (posttrain merge) or use the base model"
        )
    from transformers.utils import logging as hf_logging

    src = str(embedded_dir() if kind == "embedded" else (path or cfg.name))
    # transformers' load report (lm_head UNEXPECTED, score MISSING, in ANSI codes) says what is
    # expected here: the LM head is dropped and a fresh scoring head starts training
    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src,
            num_labels=1,
            dtype=pick_dtype(cfg.dtype, device),
            trust_remote_code=cfg.trust_remote_code,
            revision=cfg.revision,
        )
    finally:
        hf_logging.set_verbosity(level)
    tok = load_tokenizer(cfg.name, cfg.trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id  # the head finds the last non-pad token with it
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets: Any = (
            "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
        )
        peft_cfg = PeftLoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=targets,
            task_type="SEQ_CLS",  # keeps the new head fully trainable (modules_to_save)
        )
        model = get_peft_model(model, peft_cfg)
    model.to(device)
    model.train()
    return model, tok


def pair_scores(model: Any, items: list[dict[str, Any]], pad_id: int) -> torch.Tensor:
    """Scores (2B,) of chosen rows then rejected rows, in one forward pass."""
    decoder = is_decoder_head(model)
    ids, attn = collate_sequences(items, pad_id, left=decoder)
    device = next(model.parameters()).device
    ids, attn = ids.to(device), attn.to(device)
    kwargs = {"position_ids": position_ids_from_mask(attn)} if decoder else {}
    return model(input_ids=ids, attention_mask=attn, **kwargs).logits[:, 0].float()


@torch.no_grad()
def heldout_metrics(
    model: Any, items: list[dict[str, Any]], pad_id: int, batch_size: int, margin: float
) -> tuple[dict[str, float], torch.Tensor]:
    """Pairwise accuracy, mean margin and loss over held-out pairs, and their scores (N, 2):
    column 0 chosen, column 1 rejected."""
    was_training = model.training
    model.eval()
    scores = torch.cat(
        [
            torch.stack(pair_scores(model, items[s : s + batch_size], pad_id).chunk(2), 1)
            for s in range(0, len(items), batch_size)
        ]
    )
    model.train(was_training)
    _, m = bradley_terry_loss(scores[:, 0], scores[:, 1], margin=margin)
    return {f"eval/{k}": float(v) for k, v in m.items()}, scores


def pair_predictions(
    records: list[dict[str, Any]], items: list[dict[str, Any]], scores: torch.Tensor
) -> list[dict[str, Any]]:
    """One row per held-out pair: its text, the model's two scores and whether it ranks them right.

    Pairs built from a reward carry that reward's scores (score_chosen, score_rejected): they are
    kept, with their gap, so the model's mistakes can be read against how clear the pair was."""
    rows = []
    for item, (r_c, r_r) in zip(items, scores.tolist(), strict=True):
        rec = records[item["index"]]
        row = {k: rec[k] for k in ("prompt", "chosen", "rejected")}
        row.update(r_chosen=r_c, r_rejected=r_r, correct=r_c > r_r)
        if "score_chosen" in rec and "score_rejected" in rec:
            row["source_gap"] = rec["score_chosen"] - rec["score_rejected"]
        rows.append(row)
    return rows


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.train import start

    acc, run = start(cfg, "reward-model")
    train_recs, eval_recs = pair_records(cfg, run.path)
    if cfg.build.only:
        print(f"pairs written to {run.path / 'pairs.jsonl'}")
        return 0
    model, tok = load_reward_model(cfg.model, cfg.lora, acc.device)
    sfx = cfg.score_suffix
    train_items, counts = tokenize_pairs(tok, train_recs, cfg.data, joined=True, suffix=sfx)
    eval_items = (
        tokenize_pairs(tok, eval_recs, cfg.data, joined=True, suffix=sfx)[0] if eval_recs else []
    )
    run.write_json(
        "data_stats.json", {"train": len(train_items), "eval": len(eval_items), **counts}
    )
    pad = tok.pad_token_id

    def evaluate(model: Any) -> dict[str, float]:
        return heldout_metrics(model, eval_items, pad, cfg.eval_batch_size, cfg.margin)[0]

    if eval_items and not cfg.run.resume:
        with acc.autocast():  # the precision training runs in
            run.eval_record(0, run.log(0, evaluate(model)))

    def loss(model: Any, items: list[dict[str, Any]], normaliser: torch.Tensor):
        r_chosen, r_rejected = pair_scores(model, items, pad).chunk(2)  # (B,) each
        mean, metrics = bradley_terry_loss(r_chosen, r_rejected, margin=cfg.margin)
        return share(mean, metrics, len(items), normaliser)

    out = fit(acc, run, model, train_items, Objective(collate=list, units=len, loss=loss),
              cfg.optim, batch_size=cfg.batch_size, epochs=cfg.epochs, max_steps=cfg.max_steps,
              eval_every=cfg.eval_every, evaluate=evaluate if eval_items else None,
              module="model", resume=bool(cfg.run.resume))  # fmt: skip
    model, step = out.model, out.step
    if out.interrupted:
        print(f"stopped at step {step}; resume with --run.resume={run.path}")
        return 0
    if eval_items:
        final, scores = heldout_metrics(model, eval_items, pad, cfg.eval_batch_size, cfg.margin)
        run.eval_record(step, run.log(step, final))
        run.write_json("eval.json", final)
        if run.is_main:
            write_jsonl(
                run.path / "eval_pairs.jsonl", pair_predictions(eval_recs, eval_items, scores)
            )
    if run.is_main:
        save_reward_model(acc.unwrap_model(model), tok, run.path / "final", cfg.score_suffix)
    print(f"reward model saved to {run.path / 'final'} (use it as model:{run.path / 'final'})")
    run.close()
    return 0


def save_reward_model(model: Any, tok: Any, path: Any, score_suffix: str = "") -> None:
    """A plain AutoModelForSequenceClassification directory (LoRA merged), num_labels=1; a
    scoring suffix is kept in its config as `posttrain_score_suffix`."""
    from posttrain.models import is_peft

    if is_peft(model):
        model = model.merge_and_unload()
    model.config.num_labels = 1
    model.config.pad_token_id = tok.pad_token_id
    if score_suffix:
        model.config.posttrain_score_suffix = score_suffix
    model.save_pretrained(path)
    tok.save_pretrained(path)
