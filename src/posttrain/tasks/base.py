"""The task interface: prompt data with splits, a training reward, and separate evaluation metrics.

A task's rows are plain dicts. Every row has "prompt" (a string, or a list of chat messages) and
the task's own fields ("question"/"answer", "reference", ...). Batches handed to rewards and
metrics are columnar: {field: [value per row]}.

The training reward and the evaluation metrics are deliberately separate, so that evaluation can
catch a policy that games its reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from posttrain.config import check
from posttrain.rollout import GenerationConfig

Split = Literal["train", "validation", "test"]
Batch = dict[str, list[Any]]


@dataclass
class TaskConfig:
    name: str = "unit_conversion"
    """unit_conversion, sentiment, summarization, or custom"""
    source: str | None = None
    """data: a hub dataset name or a .csv/.json/.jsonl/.parquet/.pkl file (default: the task's embedded data)"""
    subset: str | None = None
    """hub dataset config name (e.g. 3.0.0 for abisee/cnn_dailymail)"""
    prompt_column: str = "prompt"
    """column holding the prompt (for sentiment: the review text; summarization: the article)"""
    reference_column: str | None = None
    """column holding a reference text (summaries)"""
    answer_column: str | None = None
    """column holding a checkable answer (custom tasks)"""
    reward: str | None = None
    """custom reward as module:function or path/to/file.py:function"""
    train_size: int = check(0, ">= 0")
    """rows in the train split (0: the task's default)"""
    validation_size: int = check(0, ">= 0")
    """rows in the validation split (0: the task's default)"""
    test_size: int = check(0, ">= 0")
    """rows in the test split (0: the task's default)"""
    seed: int = 0
    """seed for generated data and for split assignment"""
    prompt_tokens: int = check(10, ">= 1")
    """sentiment: whitespace words of the review kept as the prompt (model-independent; see docs/tasks.md)"""
    article_tokens: int = check(512, ">= 1")
    """summarization: articles are truncated to this many whitespace words"""
    rouge: Literal["rouge1", "rouge2", "rougeL"] = "rouge1"
    """summarization: the ROUGE F-score used as the reward"""
    completion_tokens: int = check(0, ">= 0")
    """sentiment and summarization: most tokens generated per prompt (0: the task's default, 20 and 64)"""
    classifier_device: str = "auto"
    """sentiment classifier device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    classifier: str = "vader"
    """sentiment reward: vader (embedded) or a sequence-classifier model (hub id or directory)"""
    positive_label: str = "POSITIVE"
    """sentiment classifier: the label name (or index) that means positive"""
    rel_tol: float = check(0.01, ">= 0")
    """unit conversion: relative tolerance for a correct answer"""
    difficulty: Literal["standard", "easy"] = "standard"
    """unit conversion: standard (all units, any values) or easy (integer factors, values 1-50)"""
    train_phrasing: Literal["fixed", "varied"] = "fixed"
    """unit conversion: train questions in the test's wordings (fixed) or in many wordings and unit names (varied)"""
    format_reward: float = 0.0
    """unit conversion: reward for a parseable <answer> tag, added to the correctness reward"""
    strategy: str = "cot"
    """prompting strategy used to build training prompts (zero_shot, few_shot, cot, direct)"""


class Task(Protocol):
    """What every task provides. Implementations live in posttrain.tasks.<name>."""

    name: str

    def rows(self, split: Split) -> list[dict[str, Any]]:
        """The rows of one split (deterministic for a given TaskConfig)."""
        ...

    def generation(self) -> GenerationConfig:
        """Sensible generation defaults for this task (max_new_tokens, stop strings, chat)."""
        ...

    def reward(self, prompts: list[str], completions: list[str], batch: Batch) -> torch.Tensor:
        """The training reward: one float per completion, shape (B,)."""
        ...

    def evaluate(
        self, completions: list[str], batch: Batch
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Evaluation metrics: (summary over the batch, one dict per example)."""
        ...


def columns(rows: list[dict[str, Any]]) -> Batch:
    """Rows -> columnar batch ({field: [values]})."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    return {k: [r.get(k) for r in rows] for k in keys}
