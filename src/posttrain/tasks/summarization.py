"""Summarization (Ziegler et al. 2019 style): article -> summary, rewarded by ROUGE.

Each article is truncated to its first `article_tokens` (default 512) words so that prompt and
summary fit the model (pass `SummarizationTask(cfg, tokenizer=tok)` to count tokens of that
tokenizer instead; words keep the prompts identical across models). The reward is the ROUGE
F-score (`--task.rouge`, rouge1 by default) of the generated summary against the reference, with
the rouge-score package (Porter stemming on). Note that ROUGE against a reference written from
the *whole* article rewards content that the truncated prompt may no longer contain.

Data: an embedded fixture of 32 short news articles with one-sentence summaries, written for this
project (posttrain/data/summarization_fixture.jsonl; columns article / highlights), so that the
task runs offline; or --task.source=abisee/cnn_dailymail --task.subset=3.0.0, or any file or
dataset (--task.prompt_column for the article, --task.reference_column for the summary; defaults
article and highlights).

Prompt: with the chat template, "Summarize the following news article in one or two sentences."
and the article as a user message; with --task.strategy=direct, the raw "{article}\\n\\nTL;DR:"
(for base models such as GPT-2).

Metrics: rouge1 / rouge2 / rougeL (mean F-scores), length_mean (summary words), compression
(summary words / words of the article as given in the prompt, averaged).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import Batch, Split, TaskConfig
from posttrain.tasks.sources import DATA_DIR, first_words, split_rows

FIXTURE = DATA_DIR / "summarization_fixture.jsonl"
EMBEDDED_SIZES = {"train": 20, "validation": 4, "test": 8}
HUB_SIZES = {"train": 2000, "validation": 100, "test": 200}
INSTRUCTION = "Summarize the following news article in one or two sentences."
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class SummarizationTask:
    """Articles -> summaries; reward ROUGE F against the reference."""

    name = "summarization"

    def __init__(self, cfg: TaskConfig, tokenizer: Any = None):
        if cfg.rouge not in ROUGE_TYPES:
            raise ConfigError(
                f"task.rouge must be one of {', '.join(ROUGE_TYPES)}, not {cfg.rouge!r}"
            )
        if cfg.article_tokens < 1:
            raise ConfigError("task.article_tokens must be >= 1")
        from rouge_score import rouge_scorer

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat = cfg.strategy != "direct"
        self.article_column = cfg.prompt_column if cfg.prompt_column != "prompt" else "article"
        self.reference_column = cfg.reference_column or "highlights"
        self.scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)

    def rows(self, split: Split) -> list[dict[str, Any]]:
        cols = [self.article_column, self.reference_column]
        if self.cfg.source is None:
            from dataclasses import replace

            cfg = replace(self.cfg, source=str(FIXTURE))
            raw = split_rows(cfg, split, EMBEDDED_SIZES, cols)
        else:
            raw = split_rows(self.cfg, split, HUB_SIZES, cols)
        rows = []
        for i, r in enumerate(raw):
            for c in cols:
                if r[c] is None or not str(r[c]).strip():
                    raise ConfigError(
                        f"{self.cfg.source or FIXTURE.name}: row {i} of split {split!r} has an empty {c!r}"
                    )
            article = first_words(
                str(r[self.article_column]), self.cfg.article_tokens, self.tokenizer
            )
            prompt: Any = (
                [{"role": "user", "content": f"{INSTRUCTION}\n\n{article}"}]
                if self.chat
                else f"{article}\n\nTL;DR:"
            )
            rows.append(
                {"prompt": prompt, "article": article, "reference": str(r[self.reference_column])}
            )
        return rows

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.cfg.completion_tokens or 64,
            temperature=1.0,
            chat=self.chat,
            max_prompt_tokens=max(1024, 2 * self.cfg.article_tokens),
        )

    def rouge(self, completions: list[str], references: list[str]) -> list[dict[str, float]]:
        """Per example: {rouge1, rouge2, rougeL} F-scores."""
        return [
            {k: s.fmeasure for k, s in self.scorer.score(str(ref), c).items()}
            for c, ref in zip(completions, references)
        ]

    def reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        scores = self.rouge(completions, batch["reference"])
        return torch.tensor([s[self.cfg.rouge] for s in scores], dtype=torch.float32)

    def evaluate(
        self, completions: list[str], batch: Batch
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        scores = self.rouge(completions, batch["reference"])
        per = []
        for s, c, a in zip(scores, completions, batch["article"]):
            words = len(c.split())
            per.append({**s, "length": words, "compression": words / max(len(a.split()), 1)})
        n = max(len(per), 1)
        summary = {k: sum(p[k] for p in per) / n for k in ROUGE_TYPES}
        summary["length_mean"] = sum(p["length"] for p in per) / n
        summary["compression"] = sum(p["compression"] for p in per) / n
        return summary, per
