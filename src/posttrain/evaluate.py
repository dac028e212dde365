"""`posttrain eval`: evaluate models and prompting strategies on a task's fixed split.

    posttrain eval --task unit_conversion --model default --strategy cot --split test --limit 200
    posttrain eval --task unit_conversion --strategy zero_shot --strategy few_shot --strategy cot
    posttrain eval --task sentiment --model default --model runs/grpo-1/checkpoints/step_000100/policy
    posttrain eval --task unit_conversion --model default --adapter runs/sft-1/final/policy

The metrics are the task's evaluation metrics (accuracy and answer rate, mean sentiment, ROUGE, ...),
computed separately from any training reward, so a policy that games its reward shows up here.
Decoding is greedy unless --temperature is set (self-consistency and tree-of-thought sample their
paths at --prompting.temperature).

Writes into the run directory: `results.jsonl` (one line per model x strategy x example: prompt,
completion, the example's metrics and the strategy's trace), `summary.json` (one entry per model x
strategy), and with more than one entry `comparison.png` (a bar chart). A table is printed.

Python API for training algorithms (before/after evaluation):

    summary, rows = evaluate(model, tok, task, strategy="cot", split="test", limit=100)
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from posttrain.config import ConfigError, ModelConfig, RunConfig
from posttrain.prompting import STRATEGIES, PromptingConfig, model_generator, run_strategy
from posttrain.tasks.base import Task, TaskConfig, columns
from posttrain.tools import Toolbox, ToolConfig, calls_in


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "task": "task.name",
        "model": "models",
        "adapter": "model.adapter",
        "strategy": "strategies",
        "source": "task.source",
        "threads": "run.threads",
        "tool": "tools.names",
    }
    models: list[str] = field(default_factory=list)
    """models to evaluate (repeat --model; default: model.name); an adapter directory works too"""
    strategies: list[str] = field(default_factory=lambda: ["default"])
    """prompting strategies (repeat --strategy): default (the task's own prompt), direct, zero_shot, few_shot, cot, self_consistency, self_reflection, tree_of_thought"""
    split: str = "test"
    """which split to evaluate: train, validation or test"""
    limit: int = 0
    """evaluate only the first N examples of the split (0: all)"""
    batch_size: int = 32
    """examples per strategy call (the progress bar advances per batch)"""
    temperature: float = 0.0
    """decoding temperature of answers (0: greedy)"""
    max_new_tokens: int = 0
    """most new tokens per answer (0: the task's default; 24 for the direct strategy)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    prompting: PromptingConfig = field(default_factory=PromptingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tools: ToolConfig = field(default_factory=ToolConfig)

    def validate(self) -> None:
        for s in self.strategies:
            if s not in STRATEGIES:
                raise ConfigError(f"unknown strategy {s!r}; choose from {', '.join(STRATEGIES)}")
        if self.split not in ("train", "validation", "test"):
            raise ConfigError(f"--split must be train, validation or test, not {self.split!r}")
        if self.limit < 0 or self.batch_size < 1:
            raise ConfigError("--limit must be >= 0 and --batch_size >= 1")


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    strategy: str = "default",
    split: str = "test",
    limit: int = 0,
    temperature: float = 0.0,
    max_new_tokens: int = 0,
    prompting: PromptingConfig | None = None,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "eval",
    tools: Toolbox | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run one strategy over a task split -> (summary metrics, one record per example).

    strategy "default" uses the rows' own prompts (the training prompt); the others build prompts
    from each row's "question" (tasks with checkable answers: unit conversion, custom with answers).
    tools: the model may call them in every generation of every strategy; each record then holds
    the calls its completion made ("tool_calls").
    """
    rows = task.rows(split)  # type: ignore[arg-type]
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ConfigError(f"task {task.name!r} has no rows in split {split!r}")
    if strategy != "default" and "question" not in rows[0]:
        raise ConfigError(
            f"strategy {strategy!r} needs question/answer rows; task {task.name!r} has none. "
            "Use --strategy default"
        )
    gen_cfg = task.generation()
    # `direct` answers are a bare <answer>x</answer>: 24 tokens are plenty
    default_tokens = 24 if strategy == "direct" else gen_cfg.max_new_tokens
    gen_cfg = dataclasses.replace(
        gen_cfg, temperature=temperature, n=1, max_new_tokens=max_new_tokens or default_tokens
    )
    gen = model_generator(model, tokenizer, tools=tools)
    prompting = prompting or PromptingConfig()
    examples: list = []
    if strategy == "few_shot" and hasattr(task, "examples"):
        # the whole train split as a pool when examples are picked per question
        pool = prompting.examples == "nearest" and hasattr(task, "example_pool")
        examples = task.example_pool() if pool else task.examples(k=prompting.shots)
    # Strategies use the chat template when the tokenizer has one, raw "Question: ... Answer:" text
    # otherwise; `direct` is always raw text.
    chat = getattr(tokenizer, "chat_template", None) is not None
    verifier = getattr(task, "verify_thoughts", None)
    instruction = getattr(task, "instruction", None)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc=desc, unit="ex", dynamic_ncols=True)
    completions: list[str] = []
    traces: list[list[str]] = []
    t0 = time.perf_counter()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if strategy == "default":
                outs = gen([r["prompt"] for r in chunk], gen_cfg)
                completions += outs
                traces += [[] for _ in outs]
            else:
                kwargs: dict[str, Any] = {"instruction": instruction} if instruction else {}
                results = run_strategy(
                    strategy,
                    gen,
                    [r["question"] for r in chunk],
                    gen_cfg=gen_cfg,
                    cfg=prompting,
                    examples=examples,
                    chat=chat,
                    parse=getattr(task, "parse", None) or _no_parse,
                    verifier=verifier,
                    **kwargs,
                )
                completions += [o.completion for o in results]
                traces += [o.trace for o in results]
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    summary, per = task.evaluate(completions, columns(rows))
    summary = {**summary, "examples": len(rows), "seconds": round(seconds, 2)}
    records = []
    for i, (r, c, t, m) in enumerate(zip(rows, completions, traces, per)):
        rec = {"index": i, "prompt": r.get("question", r["prompt"]), "completion": c, **m}
        for k in ("answer", "reference"):
            if k in r:
                rec[k] = r[k]
        if t:
            rec["trace"] = t
        if tools is not None:
            rec["tool_calls"] = [call.as_dict() for call in calls_in(c, tools)]
        records.append(rec)
    return summary, records


def _no_parse(text: str) -> None:
    return None


def main(cfg: Config) -> int:
    from posttrain.models import load_model
    from posttrain.runs import Run, seed_everything
    from posttrain.tasks import load_task

    run = Run.start(cfg.run, "eval", cfg)
    task = load_task(cfg.task)
    tools = Toolbox.from_config(cfg.tools)
    names = cfg.models or [cfg.model.name]
    entries: list[dict[str, Any]] = []
    with open(run.path / "results.jsonl", "w") as out:
        for name in names:
            model, tok = load_model(dataclasses.replace(cfg.model, name=name))
            label = name + (f"+{Path(cfg.model.adapter).name}" if cfg.model.adapter else "")
            for strategy in cfg.strategies:
                seed_everything(cfg.run.seed)
                summary, records = evaluate(
                    model,
                    tok,
                    task,
                    strategy=strategy,
                    split=cfg.split,
                    limit=cfg.limit,
                    temperature=cfg.temperature,
                    max_new_tokens=cfg.max_new_tokens,
                    prompting=cfg.prompting,
                    batch_size=cfg.batch_size,
                    progress=cfg.run.progress,
                    desc=f"{label} {strategy}",
                    tools=tools,
                )
                entries.append({"model": label, "strategy": strategy, **summary})
                for rec in records:
                    out.write(json.dumps({"model": label, "strategy": strategy, **rec}) + "\n")
                run.write_json(
                    "summary.json", {"task": task.name, "split": cfg.split, "entries": entries}
                )
            del model
    print(format_table(entries))
    if len(entries) > 1:
        bar_chart(entries, run.path / "comparison.png", title=f"{task.name} ({cfg.split})")
    print(f"results in {run.path}")
    return 0


def metric_keys(entries: list[dict[str, Any]]) -> list[str]:
    skip = {"model", "strategy", "examples", "seconds"}
    return [k for k in entries[0] if k not in skip and isinstance(entries[0][k], int | float)]


def format_table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per model x strategy."""
    keys = metric_keys(entries) + ["examples", "seconds"]
    head = ["model", "strategy", *keys]
    body = [
        [str(e["model"]), str(e["strategy"])]
        + [f"{e[k]:.4g}" if isinstance(e[k], float) else str(e[k]) for k in keys]
        for e in entries
    ]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bar_chart(entries: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Grouped bars: one group per metric, one bar per model x strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_keys(entries)
    width = 0.8 / len(entries)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(keys) * max(1, len(entries) / 3)), 3.5))
    for j, e in enumerate(entries):
        xs = [i + (j - (len(entries) - 1) / 2) * width for i in range(len(keys))]
        ax.bar(xs, [e[k] for k in keys], width, label=f"{e['model']} / {e['strategy']}")
    ax.set_xticks(range(len(keys)), keys)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
