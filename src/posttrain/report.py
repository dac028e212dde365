"""`posttrain report`: one self-contained HTML page per run.

    posttrain report runs/grpo-1                    # -> runs/grpo-1/report.html (+ plots/*.png)

A report reads only files in the run directory (docs/report.md lists them): config.toml (the
resolved config and what it implies, see posttrain.implied: prompts, samples and tokens per step,
optimizer updates per rollout), metrics.jsonl (the plots, through posttrain.plots),
eval_before.json / eval_after.json / eval_step_<N>.json (an evaluation table), samples.jsonl
(generations and their rewards at a few steps). Images are embedded as base64 data URIs and every
text is HTML-escaped (posttrain.report_html), so the page opens anywhere, offline, and shows model
output as text, never as markup. `posttrain compare` (posttrain.compare) puts several runs on the
same axes and reads each run with `load_run`.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.implied import implied
from posttrain.plots import group_metrics, logged_once, plot_records, series
from posttrain.report_html import Html, esc, fmt, img, page, table
from posttrain.runs import config_dict, read_jsonl

SAMPLE_STEPS = 4  # steps shown in the samples table
SAMPLE_ROWS = 4  # generations shown per step


# ---------------------------------------------------------------------------------------------
# Reading a run


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything a report shows, read from the run directory's files."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{str(run)!r} is not a directory")
    if not (run / "metrics.jsonl").is_file() and not (run / "config.toml").is_file():
        raise FileNotFoundError(
            f"{str(run)!r} has neither metrics.jsonl nor config.toml: is it a run directory?"
        )
    info = {}
    if (run / "run.json").is_file():
        info = json.loads((run / "run.json").read_text())
    return {
        "path": run,
        "name": run.resolve().name,
        "info": info,
        "config_text": (run / "config.toml").read_text() if (run / "config.toml").is_file() else "",
        "config": config_dict(run),
        "metrics": read_jsonl(run / "metrics.jsonl"),
        "samples": read_jsonl(run / "samples.jsonl"),
        "evals": read_evals(run),
        "results": {
            p.name: json.loads(p.read_text())
            for p in sorted(run.glob("*.json"))
            if p.name != "run.json" and not p.name.startswith("eval_")
        },
        "figures": sorted(run.glob("*.png")),
    }


def read_evals(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """label -> {"summary": {metric: value}, "examples": [...]} for eval_*.json files.

    Order: before, step_<N> by N, after, then any other label. A file may hold the summary dict
    itself or {"summary": {...}, "examples": [...]}.
    """
    found = {}
    for p in Path(run_dir).glob("eval_*.json"):
        obj = json.loads(p.read_text())
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("summary"), dict):
            summary, examples = obj["summary"], obj.get("examples") or []
        else:
            summary, examples = obj, []
        found[p.stem[len("eval_") :]] = {"summary": flatten(summary), "examples": examples}

    def order(label: str) -> tuple[int, float, str]:
        m = re.fullmatch(r"step_?(\d+)", label)
        if label == "before":
            return (0, 0, label)
        if m:
            return (1, int(m.group(1)), label)
        return (2, 0, label) if label == "after" else (3, 0, label)

    return {k: found[k] for k in sorted(found, key=order)}


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts as one level: {"a": {"b": 1}} -> {"a/b": 1} (`sep` joins the keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# Summaries


_SPREAD = re.compile(r"(^|[/_.])(std|var|min|max|count|skipped|coef|clip\w*|frac\w*)($|[/_.])")


def _direction(key: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if neither (KL, spreads, lengths...)."""
    low = key.lower()
    if _SPREAD.search(low):
        return 0
    if re.search(r"loss|nll|perplexity|ppl|error|(^|/|_)err", low):
        return -1
    if re.search(r"reward|score|acc|win|pass|exact|rouge|f1|correct|margin", low):
        return 1
    return 0


def summarize(records: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """key -> {first, final, best, best_step, n} over the logged steps (best None if no direction)."""
    data = series(records)
    out = {}
    for k in keys:
        if k not in data:
            continue
        xs, ys = data[k]
        d = _direction(k)
        i = max(range(len(ys)), key=lambda j: d * ys[j]) if d else None
        out[k] = {
            "first": ys[0],
            "final": ys[-1],
            "best": ys[i] if i is not None else None,
            "best_step": xs[i] if i is not None else None,
            "n": len(ys),
        }
    return out


def headline_keys(keys: Sequence[str], limit: int = 8) -> list[str]:
    """The keys worth a summary line: rewards, evaluation, losses, KL (in that order); in each
    group the total or mean first (`reward`, `reward/mean`, `loss/total`), spreads last."""

    def rank(g: str, k: str) -> int:
        low = k.lower()
        if low in (g, f"{g}/mean", f"{g}/total", f"{g}_mean", f"mean_{g}"):
            return 0
        return 2 if _SPREAD.search(low) else 1

    groups = group_metrics(keys)
    picked: list[str] = []
    for g in ("reward", "eval", "loss", "kl"):
        ranked = sorted(groups.get(g, []), key=lambda k: rank(g, k))
        picked += ranked[: max(1, limit // 3)]
    return picked[:limit]


# ---------------------------------------------------------------------------------------------
# Sections of the page


def tool_calls_html(calls: Any) -> Html | None:
    """A sample's `tool_calls` ([{tool, call, result, error}]) as a small table of its own, so
    that what the tools returned stands apart from what the model wrote."""
    if not isinstance(calls, list) or not calls:
        return None
    rows = []
    for c in calls:
        c = c if isinstance(c, dict) else {"call": c}
        err = c.get("error")
        result = f"<span class='down'>error: {fmt(err)}</span>" if err else fmt(c.get("result"))
        rows.append(
            f"<tr><td class='text'>{fmt(c.get('tool'))}</td><td class='text call'>"
            f"{fmt(c.get('call'))}</td><td class='text result'>{result}</td></tr>"
        )
    head = "<tr><th>tool</th><th>call</th><th>result</th></tr>"
    return Html(f"<table class='tools'>{head}{''.join(rows)}</table>")


def _sample_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells of sample records; `tool_calls` becomes a nested table after the
    completion."""
    cols = _columns(rows, skip=("tool_calls",))
    with_tools = any(r.get("tool_calls") for r in rows)
    if with_tools:
        at = cols.index("completion") + 1 if "completion" in cols else len(cols)
        cols.insert(at, "tool calls")
    cells = [
        [tool_calls_html(r.get("tool_calls")) if c == "tool calls" else r.get(c) for c in cols]
        for r in rows
    ]
    return cols, cells


def eval_section(evals: dict[str, dict[str, Any]]) -> str:
    if not evals:
        return ""
    labels = list(evals)
    keys: list[str] = []
    for e in evals.values():
        keys += [k for k in e["summary"] if k not in keys]
    header = ["metric", *labels]
    rows = []
    with_change = "before" in evals and "after" in evals
    if with_change:
        header.append("after - before")
    for k in keys:
        vals = [evals[lab]["summary"].get(k) for lab in labels]
        row: list[Any] = [k, *vals]
        if with_change:
            b, a = evals["before"]["summary"].get(k), evals["after"]["summary"].get(k)
            num = all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))
            row.append(a - b if num else None)
        rows.append(row)
    out = ["<h2>Evaluation</h2>", table(header, rows)]
    for lab, e in evals.items():
        ex = [x for x in e["examples"] if isinstance(x, dict)][:SAMPLE_ROWS]
        if ex:
            out.append(f"<details><summary>examples: {esc(lab)}</summary>")
            out.append(table(*_sample_rows(ex)) + "</details>")
    return "\n".join(out)


def _columns(rows: Sequence[dict[str, Any]], skip: Sequence[str] = ()) -> list[str]:
    first = [c for c in ("step", "prompt", "completion") if any(c in r for r in rows)]
    cols = list(first)
    for r in rows:
        cols += [c for c in r if c not in cols and c not in skip]
    return cols


def results_section(results: dict[str, Any]) -> str:
    """Other JSON files the command wrote (results.json, data_stats.json, summary.json, ...)."""
    out = []
    for name, obj in results.items():
        out.append(f"<h3>{esc(name)}</h3>")
        if isinstance(obj, list):
            obj = {"rows": obj}
        if not isinstance(obj, dict):
            out.append(f"<pre>{fmt(obj)}</pre>")
            continue
        flat = flatten(obj)
        scalars = [[k, v] for k, v in flat.items() if not _is_rows(v)]
        if scalars:
            out.append(table(["key", "value"], scalars[:200]))
        for k, v in flat.items():
            if _is_rows(v):
                rows = [flatten(r) for r in v[:20]]
                cols = _columns(rows)
                out.append(f"<p>{esc(k)} ({len(v)} rows)</p>")
                out.append(table(cols, [[r.get(c) for c in cols] for r in rows]))
    return "<h2>Result files</h2>" + "\n".join(out) if out else ""


def _is_rows(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def pick_steps(steps: Sequence[int], k: int = SAMPLE_STEPS) -> list[int]:
    """k steps spread evenly from the first to the last (all of them when there are k or fewer)."""
    steps = sorted(set(steps))
    if len(steps) <= k:
        return steps
    idx = sorted({round(i * (len(steps) - 1) / (k - 1)) for i in range(k)})
    return [steps[i] for i in idx]


def samples_section(samples: list[dict[str, Any]]) -> str:
    if not samples:
        return ""
    shown = pick_steps([s.get("step", 0) for s in samples])
    rows = []
    for st in shown:
        rows += [s for s in samples if s.get("step", 0) == st][:SAMPLE_ROWS]
    return (
        f"<h2>Sample generations</h2><p class='muted'>{SAMPLE_ROWS} per step at steps "
        f"{esc(', '.join(map(str, shown)))} (of {len(samples)} rows in samples.jsonl)</p>"
        + table(*_sample_rows(rows))
    )


def last_step(metrics: Sequence[dict[str, Any]]) -> int | None:
    """The highest step logged: the number of training steps (log lines may repeat a step)."""
    steps = [m["step"] for m in metrics if isinstance(m.get("step"), int | float)]
    return int(max(steps)) if steps else None


def once_section(metrics: list[dict[str, Any]]) -> str:
    """Metrics logged at a single step: a table of numbers rather than one-dot charts."""
    once = logged_once(metrics)
    if not once:
        return ""
    rows = [[k, v, step] for k, (step, v) in once.items()]
    return "<h2>Logged once</h2>" + table(["metric", "value", "at step"], rows)


def eval_run_section(results: dict[str, Any], plots_dir: Path, has_chart: bool) -> str:
    """`posttrain eval`'s summary.json: its results table and a bar chart of every metric."""
    summ = results.get("summary.json")
    if not isinstance(summ, dict) or not _is_rows(summ.get("entries")):
        return ""
    entries = summ["entries"]
    cols = _columns(entries)
    out = [
        "<h2>Results</h2>",
        f"<p class='muted'>task {esc(summ.get('task', '?'))}, split {esc(summ.get('split', '?'))}"
        "; one row per model x strategy (results.jsonl holds every example)</p>",
        table(cols, [[e.get(c) for c in cols] for e in entries]),
    ]
    if not has_chart:  # `eval` draws comparison.png for two or more entries only
        from posttrain.evaluate import bar_chart

        plots_dir.mkdir(parents=True, exist_ok=True)
        out.append(img(bar_chart(entries, plots_dir / "results.png", title=summ.get("task", ""))))
    return "\n".join(out)


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of one run (default RUN_DIR/report.html) and its PNGs (RUN_DIR/plots,
    or OUT_STEM_plots/ beside `out`, so a report of someone else's run leaves it untouched).
    An `eval` run shows its results table and bar chart and no training sections."""
    r = load_run(run_dir)
    run: Path = r["path"]
    plots_dir = run / "plots" if out is None else Path(out).parent / f"{Path(out).stem}_plots"
    out = Path(out) if out else run / "report.html"
    command = r["info"].get("command", "")
    if command == "eval":
        return _eval_report(r, out, plots_dir)
    pngs = plot_records(r["metrics"], plots_dir, title=r["name"]) if r["metrics"] else []
    keys = list(series(r["metrics"]))
    last = last_step(r["metrics"])
    started = r["info"].get("started")
    parts = [
        f"<h1>{esc(r['name'])}</h1>",
        "<p class='muted'>"
        + esc(
            f"command: {command or '?'} | run directory: {run.resolve()} | "
            f"started: {time.strftime('%Y-%m-%d %H:%M', time.localtime(started)) if started else '?'} | "
            f"steps: {last} ({len(r['metrics'])} records in metrics.jsonl)"
        )
        + "</p>",
    ]
    summ = summarize(
        r["metrics"], [k for k in headline_keys(keys) if k not in logged_once(r["metrics"])]
    )
    if summ:
        parts += [
            "<h2>Summary</h2>",
            table(
                ["metric", "first", "final", "best", "at step"],
                [[k, s["first"], s["final"], s["best"], s["best_step"]] for k, s in summ.items()],
            ),
        ]
    rows = implied(r["config"], command)
    if rows:
        parts += ["<h2>What the config implies</h2>", table(["quantity", "value", "from"], rows)]
        parts.append("<p class='muted'>batch sizes are per process (x N under accelerate)</p>")
    parts.append(eval_section(r["evals"]))
    if pngs:
        parts.append("<h2>Training curves</h2>")
        parts.append(
            "<p class='muted'>thin: raw values; thick: exponential moving average over about a tenth of the run</p>"
        )
        parts += [img(p) for p in pngs]
    elif not r["metrics"]:
        parts.append("<p class='muted'>metrics.jsonl is empty: nothing to plot yet.</p>")
    parts.append(once_section(r["metrics"]))
    parts.append(samples_section(r["samples"]))
    parts.append(results_section(r["results"]))
    if r["figures"]:
        parts.append("<h2>Figures in the run directory</h2>")
        parts += [img(p) for p in r["figures"]]
    if r["config_text"]:
        parts += ["<h2>Resolved config</h2>", f"<pre>{esc(r['config_text'])}</pre>"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"posttrain report: {r['name']}", "\n".join(p for p in parts if p)))
    return out


def _eval_report(r: dict[str, Any], out: Path, plots_dir: Path) -> Path:
    started = r["info"].get("started")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(started)) if started else "?"
    has_chart = any(p.name == "comparison.png" for p in r["figures"])
    parts = [
        f"<h1>{esc(r['name'])}</h1>",
        f"<p class='muted'>command: eval | run directory: {esc(r['path'].resolve())} | "
        f"started: {esc(when)}</p>",
        eval_run_section(r["results"], plots_dir, has_chart),
        results_section({k: v for k, v in r["results"].items() if k != "summary.json"}),
    ]
    if r["figures"]:
        parts += [img(p) for p in r["figures"]]
    if r["config_text"]:
        parts += ["<h2>Resolved config</h2>", f"<pre>{esc(r['config_text'])}</pre>"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page(f"posttrain report: {r['name']}", "\n".join(p for p in parts if p)))
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def cli(command: str, argv: list[str]) -> int:
    """`posttrain report RUN_DIR [--out FILE]`."""
    p = argparse.ArgumentParser(
        prog="posttrain report",
        description="Build a self-contained HTML report (config, curves, evals, samples).",
    )
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl, config.toml)")
    p.add_argument(
        "--out",
        help="HTML file to write (default RUN_DIR/report.html, PNGs in RUN_DIR/plots/); "
        "with --out X.html the PNGs go to X_plots/ beside it",
    )
    a = p.parse_args(argv)
    try:
        path = build_report(a.run_dir, a.out)
    except FileNotFoundError as e:
        p.error(str(e))
    print(f"wrote {path}")
    return 0


__all__ = [
    "build_report",
    "cli",
    "headline_keys",
    "last_step",
    "load_run",
    "read_evals",
    "summarize",
]
