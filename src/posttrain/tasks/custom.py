"""Custom tasks from a config: your data, your column names, your reward function.

    [task]
    name = "custom"
    source = "data/questions.csv"      # .csv .tsv .json .jsonl .parquet .pkl, a saved dataset, or a hub name
    prompt_column = "question"         # required
    answer_column = "answer"           # optional: a checkable answer (number or text)
    reference_column = "solution"      # optional: a reference text, handed to the reward
    reward = "my_rewards.py:score"     # or "package.module:function"

The reward function has the batch signature

    def score(prompts: list[str], completions: list[str], batch: dict[str, list]) -> list[float]

`batch` is columnar, one list per field of the rows: "prompt", "question" (the prompt column's
text), "answer" and "reference" when mapped, and every original column of the data. It returns one
finite float per completion (a list, tuple or tensor). Without a reward function, a task with an
answer column is rewarded 1 for a correct <answer>...</answer> (numbers within task.rel_tol,
text compared case- and space-insensitively) plus task.format_reward for a parseable tag.

Files have no splits: rows are shuffled by task.seed and cut into test (10 %), validation (10 %)
and train (the rest), or the sizes set in task.*_size. Hub datasets use their own splits (a
missing validation/test split is carved from train).

With an answer column the prompt is built by posttrain.prompting from the question and
task.strategy (cot by default), so every prompting strategy works in `posttrain eval`; without
one, the prompt column is used as it is (a chat user message, or raw text with
--task.strategy=direct).

Errors name the row and the column: a missing column, an empty value, an empty split, a reward
that raises (re-run row by row to find the row) or returns NaN/inf or the wrong number of values.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.prompts import answer_span, build_prompt, parse_number
from posttrain.rollout import GenerationConfig
from posttrain.tasks.base import Batch, Split, TaskConfig
from posttrain.tasks.sources import split_rows

FILE_SIZES = {"train": 0, "validation": 0, "test": 0}  # 0: 10 % each, see _sizes


class CustomTask:
    """Prompts (and answers/references) from a table; reward from a Python function."""

    name = "custom"

    def __init__(self, cfg: TaskConfig):
        if not cfg.source:
            raise ConfigError(
                "task custom needs data: set --task.source to a .csv/.json/.jsonl/.parquet/.pkl "
                "file or a hub dataset name"
            )
        if not cfg.reward and not cfg.answer_column:
            raise ConfigError(
                "task custom needs a reward: --task.reward=module:function (or file.py:function), "
                "or --task.answer_column to reward correct <answer> tags"
            )
        self.cfg = cfg
        self.chat = cfg.strategy != "direct"
        self.fn = None
        if cfg.reward:
            from posttrain.rewards import load_function

            self.fn = load_function(cfg.reward)
        self.columns = [
            c for c in (cfg.prompt_column, cfg.answer_column, cfg.reference_column) if c
        ]
        self._cache: dict[str, list[dict[str, Any]]] = {}

    def _raw(self, split: str) -> list[dict[str, Any]]:
        if split not in self._cache:
            self._cache[split] = split_rows(self.cfg, split, self._sizes(), self.columns)
        return self._cache[split]

    def _sizes(self) -> dict[str, int]:
        """Defaults for unsplit files: 10 % test, 10 % validation (at least 1 each)."""
        from posttrain.tasks.sources import FILE_SUFFIXES, load_file

        src = self.cfg.source or ""
        if not src.lower().endswith(FILE_SUFFIXES):
            return {"train": 100_000, "validation": 200, "test": 500}
        n = len(load_file(src, self.cfg.subset))
        tenth = max(1, n // 10)
        return {"train": 0, "validation": tenth, "test": tenth}

    def rows(self, split: Split) -> list[dict[str, Any]]:
        cfg = self.cfg
        examples = self.examples() if cfg.strategy == "few_shot" and cfg.answer_column else []
        rows = []
        for i, r in enumerate(self._raw(split)):
            for c in self.columns:
                if r.get(c) is None or (isinstance(r[c], str) and not r[c].strip()):
                    raise ConfigError(
                        f"{cfg.source}: row {i} of split {split!r} has an empty value in column {c!r}"
                    )
            question = str(r[cfg.prompt_column])
            row = {**r, "question": question}
            if cfg.answer_column:
                row["answer"] = r[cfg.answer_column]
                row["prompt"] = build_prompt(
                    question, cfg.strategy, examples=examples, chat=self.chat
                )
            else:
                row["prompt"] = question
            if cfg.reference_column:
                row["reference"] = str(r[cfg.reference_column])
            rows.append(row)
        return rows

    def examples(self, k: int = 3) -> list[tuple[str, str]]:
        """Few-shot examples: the first k train rows as question -> <answer>answer</answer>."""
        if not self.cfg.answer_column:
            return []
        train = self._raw("train")[:k]
        return [
            (str(r[self.cfg.prompt_column]), f"<answer>{r[self.cfg.answer_column]}</answer>")
            for r in train
        ]

    def example_pool(self) -> list[tuple[str, str]]:
        """Every train row as an example (for examples picked per question)."""
        if not self.cfg.answer_column:
            return []
        c = self.cfg
        return [
            (str(r[c.prompt_column]), f"<answer>{r[c.answer_column]}</answer>")
            for r in self._raw("train")
        ]

    def generation(self) -> GenerationConfig:
        if self.cfg.answer_column:
            return GenerationConfig(
                max_new_tokens=self.cfg.completion_tokens or 96, stop=["</answer>"], chat=self.chat
            )
        return GenerationConfig(max_new_tokens=self.cfg.completion_tokens or 128, chat=self.chat)

    def parse(self, completion: str) -> Any:
        """The answer in the last <answer> tag: a number when it reads as one, else the text."""
        span = answer_span(completion)
        if span is None:
            return None
        num = parse_number(span)
        return num if num is not None else " ".join(span.lower().split()) or None

    def correct(self, completion: str, answer: Any) -> bool:
        pred = self.parse(completion)
        if pred is None:
            return False
        truth = parse_number(str(answer)) if not isinstance(answer, int | float) else float(answer)
        if isinstance(pred, float) and truth is not None:
            if truth == 0:
                return abs(pred) <= self.cfg.rel_tol
            return abs(pred - truth) <= self.cfg.rel_tol * abs(truth)
        return str(pred) == " ".join(str(answer).lower().split())

    def reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        if self.fn is None:
            r = [
                float(self.correct(c, a)) + self.cfg.format_reward * (self.parse(c) is not None)
                for c, a in zip(completions, batch["answer"])
            ]
            return torch.tensor(r, dtype=torch.float32)
        return self.call_reward(prompts, completions, batch)

    def call_reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        """Run the user's function; on failure, name the row (and the column for NaN/inf)."""
        spec = self.cfg.reward
        try:
            out = self.fn(prompts, completions, batch)  # type: ignore[misc]
        except Exception as e:
            row = self._failing_row(prompts, completions, batch)
            where = f" on row {row} (prompt {str(prompts[row])[:60]!r})" if row is not None else ""
            raise ConfigError(f"reward {spec} raised{where}: {type(e).__name__}: {e}") from e
        values = torch.as_tensor(out, dtype=torch.float32).flatten()
        if values.numel() != len(completions):
            raise ConfigError(
                f"reward {spec} returned {values.numel()} values for {len(completions)} completions; "
                "return one float per completion"
            )
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ConfigError(
                f"reward {spec} returned {values[i].item()} for row {i} (prompt "
                f"{str(prompts[i])[:60]!r}, column {self.cfg.prompt_column!r}); "
                "rewards must be finite numbers"
            )
        return values

    def _failing_row(self, prompts: list[str], completions: list[str], batch: Batch) -> int | None:
        for i in range(len(completions)):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            try:
                self.fn(prompts[i : i + 1], completions[i : i + 1], one)  # type: ignore[misc]
            except Exception:
                return i
        return None

    def evaluate(
        self, completions: list[str], batch: Batch
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        n = max(len(completions), 1)
        per: list[dict[str, Any]] = [{} for _ in completions]
        summary: dict[str, float] = {}
        if self.cfg.answer_column:
            for p, c, a in zip(per, completions, batch["answer"]):
                p["parsed"] = self.parse(c)
                p["correct"] = self.correct(c, a)
            summary["accuracy"] = sum(p["correct"] for p in per) / n
            summary["answer_rate"] = sum(p["parsed"] is not None for p in per) / n
        if self.fn is not None:
            prompts = [str(q) for q in batch["question"]]
            rewards = self.call_reward(prompts, completions, batch).tolist()
            for p, r in zip(per, rewards):
                p["reward"] = r
            summary["reward_mean"] = sum(rewards) / n
        summary["length_mean"] = sum(len(c.split()) for c in completions) / n
        return summary, per
