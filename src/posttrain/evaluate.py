"""`posttrain eval`: evaluate models and prompting strategies on a task's fixed split.

    posttrain eval --task unit_conversion --model default --strategy cot --split test --limit 200
    posttrain eval --task unit_conversion --strategy zero_shot --strategy few_shot --strategy cot
    posttrain eval --task sentiment --model default --model runs/grpo-1/checkpoints/step_000100/policy
    posttrain eval --task unit_conversion --model default --adapter runs/sft-1/final/policy
    posttrain eval --adapter runs/sft-1/final --task custom --task.source questions.csv \
        --task.prompt_column question --task.answer_column answer

A folder trained by posttrain holds posttrain.json (`runs.write_trained_format`): the task it was
trained on, its prompt format (strategy, chat, system prompt) and its tools. `eval --model FOLDER`
or `--adapter FOLDER` uses them for what the command line leaves unset: the task when no --task
option is given, the strategy when no --strategy is, the tools when no --tool is, the system
prompt when --system_prompt is unset (`--trained_format=false`: ignore the file).

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

from posttrain.config import ConfigError, ModelConfig, RunConfig, check
from posttrain.prompting import STRATEGIES, PromptingConfig, model_generator, run_strategy
from posttrain.tasks.base import Task, TaskConfig, columns
from posttrain.tools import Toolbox, ToolConfig, calls_in
from posttrain.train import uses_run_settings


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
    strategies: list[str] = field(default_factory=list)
    """prompting strategies (repeat --strategy): default (the task's own prompt), direct, zero_shot, few_shot, cot, self_consistency, self_reflection, tree_of_thought (unset: the trained folder's, else default)"""
    split: str = "test"
    """which split to evaluate: train, validation or test"""
    limit: int = check(0, ">= 0")
    """evaluate only the first N examples of the split (0: all)"""
    batch_size: int = check(32, ">= 1")
    """examples per strategy call (the progress bar advances per batch)"""
    temperature: float = check(0.0, ">= 0")
    """decoding temperature of answers (0: greedy)"""
    max_new_tokens: int = check(0, ">= 0")
    """most new tokens per answer (0: the task's default; 24 for the direct strategy without tools)"""
    system_prompt: str | None = None
    """system message for chat prompts (unset: the trained folder's, else none)"""
    trained_format: bool = True
    """read posttrain.json of a trained --model/--adapter folder: its task, strategy, system prompt and tools fill what the command line leaves unset"""
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
    system_prompt: str | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run one strategy over a task split -> (summary metrics, one record per example).

    strategy "default" uses the rows' own prompts (the training prompt); the others build prompts
    from each row's "question" (tasks with checkable answers: unit conversion, custom with answers).
    tools: the model may call them in every generation of every strategy; each record then holds
    the calls its completion made ("tool_calls"). system_prompt: added to chat prompts.
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
    # `direct` answers are a bare <answer>x</answer>: 24 tokens are plenty (not with tool calls)
    default_tokens = 24 if strategy == "direct" and tools is None else gen_cfg.max_new_tokens
    gen_cfg = dataclasses.replace(
        gen_cfg, temperature=temperature, n=1, max_new_tokens=max_new_tokens or default_tokens
    )
    if system_prompt is not None:
        gen_cfg = dataclasses.replace(gen_cfg, system_prompt=system_prompt)
    gen = model_generator(model, tokenizer, tools=tools)
    prompting = prompting or PromptingConfig()
    examples: list = []
    if strategy == "few_shot" and hasattr(task, "examples"):
        # the whole train split as a pool when examples are picked per question
        pool = prompting.examples == "nearest" and hasattr(task, "example_pool")
        # with tools, a task that has worked examples calling them shows those
        kw = {"tools": True} if tools is not None and getattr(task, "tool_examples", False) else {}
        examples = task.example_pool(**kw) if pool else task.examples(k=prompting.shots, **kw)
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


@dataclass
class Setup:
    """What one model is evaluated with: the command line, filled from its posttrain.json."""

    task: TaskConfig
    strategies: list[str]
    tools: ToolConfig
    system_prompt: str | None
    trained: str = ""
    """what was taken from posttrain.json, for the log ("" : nothing)"""


def for_trained(cfg: Config, folder: str | None) -> Setup:
    """cfg's task, strategies, tools and system prompt; those the command line left unset come from
    the trained folder's posttrain.json when it has one (and cfg.trained_format)."""
    from posttrain.runs import read_trained_format

    info = read_trained_format(folder) if cfg.trained_format else None
    setup = Setup(cfg.task, cfg.strategies or ["default"], cfg.tools, cfg.system_prompt)
    if info is None:
        return setup
    taken = []
    if info.get("task") and cfg.task == TaskConfig():  # no --task option given
        known = {f.name for f in dataclasses.fields(TaskConfig)}
        setup.task = TaskConfig(**{k: v for k, v in info["task"].items() if k in known})
        taken.append(f"task {setup.task.name}")
    if info.get("strategy") and not cfg.strategies:
        setup.strategies = [info["strategy"]]
        taken.append(f"strategy {info['strategy']}")
    if info.get("tools") and not cfg.tools.names:
        setup.tools = ToolConfig(**info["tools"])
        taken.append(f"tools {', '.join(setup.tools.names)}")
    if info.get("system_prompt") is not None and cfg.system_prompt is None:
        setup.system_prompt = info["system_prompt"]
        taken.append("system prompt")
    if taken:
        setup.trained = "from posttrain.json: " + "; ".join(taken)
    return setup


@uses_run_settings
def main(cfg: Config) -> int:
    from posttrain.models import load_model
    from posttrain.runs import Run, seed_everything
    from posttrain.tasks import load_task

    run = Run.start(cfg.run, "eval", cfg)
    names = cfg.models or [cfg.model.name]
    entries: list[dict[str, Any]] = []
    with open(run.path / "results.jsonl", "w") as out:
        for name in names:
            model_cfg = dataclasses.replace(cfg.model, name=name)
            model, tok = load_model(model_cfg, onednn=cfg.run.onednn)
            label = name + (f"+{Path(cfg.model.adapter).name}" if cfg.model.adapter else "")
            setup = for_trained(cfg, cfg.model.adapter or name)
            task = load_task(setup.task)
            tools = Toolbox.from_config(setup.tools)
            strategies = setup.strategies
            trained_only = not cfg.strategies and strategies != ["default"]
            if trained_only and "question" not in task.rows(cfg.split)[0]:
                strategies = ["default"]  # a trained strategy needs question rows
            if setup.trained:
                print(f"{label}: {setup.trained}", flush=True)
            for strategy in strategies:
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
                    system_prompt=setup.system_prompt,
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
