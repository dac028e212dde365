"""Shipped tasks (unit conversion, sentiment, summarization) and custom tasks from a config."""

from __future__ import annotations

from posttrain.config import ConfigError
from posttrain.tasks.base import Task, TaskConfig, columns

__all__ = ["Task", "TaskConfig", "columns", "load_task"]


def load_task(cfg: TaskConfig) -> Task:
    """Build the task named in cfg.name."""
    if cfg.name == "unit_conversion":
        from posttrain.tasks.unit_conversion import UnitConversionTask

        return UnitConversionTask(cfg)
    if cfg.name == "sentiment":
        from posttrain.tasks.sentiment import SentimentTask

        return SentimentTask(cfg)
    if cfg.name == "summarization":
        from posttrain.tasks.summarization import SummarizationTask

        return SummarizationTask(cfg)
    if cfg.name == "custom":
        from posttrain.tasks.custom import CustomTask

        return CustomTask(cfg)
    raise ConfigError(
        f"unknown task {cfg.name!r}; use unit_conversion, sentiment, summarization or custom"
    )
