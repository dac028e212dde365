"""Sentiment steering: continue a movie-review opening so that the review turns positive.

A prompt is the first `prompt_tokens` (default 10) words of a review; the policy continues it for
`completion_tokens` (default 20) tokens as raw text (no chat template). The reward is the
probability that the whole text, prompt + continuation, is positive: the classifier judges the
review the reader sees, and a continuation cannot score by contradicting an opening it ignores.

Prompt length is counted in whitespace words, not tokens, by default, so that every policy (and
every tokenizer) is given the same prompts and evaluations stay comparable across models; pass
`SentimentTask(cfg, tokenizer=tok)` to cut at `prompt_tokens` tokens of that tokenizer instead.

Data: the embedded default is 499 hand-written review openings (posttrain/data/
sentiment_openings.txt): neutral or mixed starts, none already positive. Or --task.source=imdb (the
hub dataset, column `text`) or any file/dataset with a text column (--task.prompt_column; `text` is
used when the default `prompt` column is absent).

Reward models (--task.classifier): `vader` (embedded, the vaderSentiment lexicon; the compound
score c in [-1, 1] is mapped to (c + 1) / 2), or any sequence classifier loadable by
AutoModelForSequenceClassification (hub id or local directory; e.g. lvwerra/distilbert-imdb),
with --task.positive_label naming the positive class (a label name or an index). The classifier
runs batched on its own device (--task.classifier_device).

Metrics: reward_mean, positive_share (reward > 0.5), distinct_1 / distinct_2 (unique word uni-/
bigrams over all continuations divided by their count), length_mean (continuation words).
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import Batch, Split, TaskConfig
from posttrain.tasks.sources import carve, clean, first_words, read_lines, sizes, split_rows

DEFAULT_SIZES = {"train": 20000, "validation": 50, "test": 200}  # train: all the rest


class Vader:
    """VADER compound score mapped to [0, 1]: (c + 1) / 2."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, texts: list[str]) -> list[float]:
        return [(self.analyzer.polarity_scores(t)["compound"] + 1) / 2 for t in texts]


class Classifier:
    """P(positive) from a sequence classifier, batched, on its own device."""

    def __init__(self, name: str, positive_label: str, device: str = "auto", batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import pick_device

        try:
            self.tok = AutoTokenizer.from_pretrained(name)
            self.model = AutoModelForSequenceClassification.from_pretrained(name)
        except OSError as e:
            raise ConfigError(
                f"cannot load sentiment classifier {name!r}: {e}\nGive `vader`, a local directory, "
                "or a hub id in the local cache."
            ) from e
        self.device = pick_device(device)
        self.model.to(self.device).eval()
        self.index = positive_index(self.model.config.id2label, positive_label, name)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> list[float]:
        out: list[float] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(
                texts[s : s + self.batch_size],
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()  # (B, C)
            out += torch.softmax(logits, -1)[:, self.index].tolist()
        return out


def positive_index(id2label: dict[int, str], label: str, name: str) -> int:
    """The class index for `label`: an index ("1") or a label name (case-insensitive)."""
    labels = {int(i): str(v) for i, v in id2label.items()}
    if label.isdigit() and int(label) in labels:
        return int(label)
    for i, v in labels.items():
        if v.lower() == label.lower():
            return i
    listed = ", ".join(f"{i}={v}" for i, v in sorted(labels.items()))
    raise ConfigError(
        f"classifier {name!r} has no label {label!r}; its labels are {listed}. "
        "Set --task.positive_label to one of these names or indices."
    )


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams / all word n-grams, pooled over texts (0 when there are none)."""
    grams = [tuple(w[i : i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class SentimentTask:
    """Review openings -> continuations; reward P(positive) of prompt + continuation."""

    name = "sentiment"

    def __init__(self, cfg: TaskConfig, tokenizer: Any = None):
        if cfg.prompt_tokens < 1 or cfg.completion_tokens < 0:
            raise ConfigError("task.prompt_tokens must be >= 1 and task.completion_tokens >= 0")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self._scorer: Any = None

    def rows(self, split: Split) -> list[dict[str, Any]]:
        cfg = self.cfg
        if cfg.source is None:
            texts = carve(
                read_lines("sentiment_openings.txt"),
                split,
                cfg.seed,
                sizes(cfg, DEFAULT_SIZES),
                "embedded sentiment openings",
            )
        else:
            column = self._column()
            texts = [r[column] for r in split_rows(cfg, split, DEFAULT_SIZES, [column])]
        rows = []
        for i, t in enumerate(texts):
            if t is None or not str(t).strip():
                raise ConfigError(
                    f"{cfg.source}: row {i} of split {split!r} has an empty {self._column()!r}"
                )
            rows.append({"prompt": first_words(str(t), cfg.prompt_tokens, self.tokenizer)})
        return rows

    def _column(self) -> str:
        """The text column: prompt_column, or `text` when the default `prompt` is absent."""
        if self.cfg.source is None or self.cfg.prompt_column != "prompt":
            return self.cfg.prompt_column
        from posttrain.data import load_table
        from posttrain.tasks.sources import FILE_SUFFIXES

        if not self.cfg.source.lower().endswith(FILE_SUFFIXES):
            # hub datasets: imdb and most review sets call the column "text"
            return "text"
        names = load_table(self.cfg.source, "train", self.cfg.subset).column_names
        return "prompt" if "prompt" in names or "text" not in names else "text"

    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.cfg.completion_tokens or 20, temperature=1.0, chat=False
        )

    def scorer(self) -> Any:
        if self._scorer is None:
            c = self.cfg.classifier
            self._scorer = (
                Vader()
                if c == "vader"
                else Classifier(c, self.cfg.positive_label, self.cfg.classifier_device)
            )
        return self._scorer

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [clean(p + c) for p, c in zip(prompts, completions)]
        return self.scorer()(texts)

    def reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        # the batch's own prompts (plain text) rather than the rendered ones
        return torch.tensor(
            self.score(batch.get("prompt", prompts), completions), dtype=torch.float32
        )

    def evaluate(
        self, completions: list[str], batch: Batch
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        rewards = self.score(batch["prompt"], completions)
        lengths = [len(c.split()) for c in completions]
        n = max(len(rewards), 1)
        summary = {
            "reward_mean": sum(rewards) / n,
            "positive_share": sum(r > 0.5 for r in rewards) / n,
            "distinct_1": distinct_n(completions, 1),
            "distinct_2": distinct_n(completions, 2),
            "length_mean": sum(lengths) / n,
        }
        return summary, [{"reward": r, "length": k} for r, k in zip(rewards, lengths)]
