"""`posttrain compare`: several runs on the same axes in one HTML page (a KL or beta sweep).

    posttrain compare runs/kl-0.01 runs/kl-0.1      # -> runs/compare.html (+ compare_plots/*.png)
    posttrain compare runs/beta-* --metric reward --metric kl --out beta.html

Each run is read as `posttrain report` reads it (`report.load_run`); the runs are labelled by the
config keys that differ between them (`beta=0.1`), and the page holds a summary table, the config
differences, the curves of every run on shared axes (`plots.plot_compare`) and the evaluations.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posttrain.plots import plot_compare, series
from posttrain.report import flatten, headline_keys, last_step, load_run, summarize
from posttrain.report_html import img, page, table


def _flat_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys: {"optim": {"lr": 1e-5}} -> {"optim.lr": 1e-5}."""
    return flatten(cfg, sep=".")


def config_differences(configs: Sequence[dict[str, Any]]) -> list[str]:
    """Dotted config keys whose values differ between runs (run.* bookkeeping left out)."""
    flats = [_flat_config(c) for c in configs]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    ignore = ("run.name", "run.out_dir", "run.resume", "run.progress", "run.threads")
    return [
        k
        for k in keys
        if k not in ignore and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1
    ]


def run_labels(runs: Sequence[dict[str, Any]], diffs: Sequence[str]) -> list[str]:
    """'beta=0.1' style labels from the differing config keys, else the directory names.

    Keys whose value is different in every run (a sweep's variable) label the runs alone; keys
    that only some runs change (a sweep that evaluates its first run only, or reuses a cache
    from its second run on) stay in the "Config differences" table."""
    flats = [_flat_config(r["config"]) for r in runs]
    distinct = [
        k for k in diffs if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) == len(runs)
    ]
    diffs = distinct or diffs
    if not diffs:
        labels = [r["name"] for r in runs]
    else:
        short = [k.rsplit(".", 1)[-1] for k in diffs]
        if len(set(short)) < len(short):
            short = list(diffs)
        labels = []
        for r in runs:
            flat = _flat_config(r["config"])
            labels.append(", ".join(f"{s}={flat.get(k)}" for s, k in zip(short, diffs)))
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({r['name']})" for lab, r in zip(labels, runs)]
    return labels


def build_compare(
    run_dirs: Sequence[str | Path],
    out: str | Path | None = None,
    metrics: Sequence[str] | None = None,
) -> Path:
    """Write one HTML page (and PNGs beside it) with several runs on the same axes."""
    # a shell glob over a sweep's folder (runs/dpo-sweep/beta_*) also matches its own files
    # (beta_sweep.png): only directories are runs
    run_dirs = [d for d in run_dirs if Path(d).is_dir() or not Path(d).exists()]
    if len(run_dirs) < 1:
        raise ValueError("compare needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        parents = {r["path"].resolve().parent for r in runs}
        out = (parents.pop() if len(parents) == 1 else Path.cwd()) / "compare.html"
    out = Path(out)
    diffs = config_differences([r["config"] for r in runs])
    labels = run_labels(runs, [d for d in diffs if not d.startswith("model.")] or diffs)
    pngs = plot_compare(
        {lab: r["metrics"] for lab, r in zip(labels, runs)},
        out.parent / f"{out.stem}_plots",
        metrics=metrics,
    )
    keys: list[str] = []
    for r in runs:
        keys += [k for k in series(r["metrics"]) if k not in keys]
    shown = list(metrics) if metrics else headline_keys(keys, limit=6)
    header = ["run", "directory", "steps"]
    for k in shown:
        header += [f"{k} final", f"{k} best"]
    rows = []
    for lab, r in zip(labels, runs):
        s = summarize(r["metrics"], shown)
        row: list[Any] = [lab, str(r["path"]), last_step(r["metrics"])]
        for k in shown:
            row += [s[k]["final"], s[k]["best"]] if k in s else [None, None]
        rows.append(row)
    parts = [
        f"<h1>Comparing {len(runs)} runs</h1>",
        "<h2>Summary</h2>",
        table(header, rows),
        "<p class='muted'>best: highest reward/score/accuracy, lowest loss; "
        "blank where neither is better (KL, lengths, times)</p>",
    ]
    if diffs:
        flats = [_flat_config(r["config"]) for r in runs]
        parts += [
            "<h2>Config differences</h2>",
            table(["key", *labels], [[k, *[f.get(k) for f in flats]] for k in diffs]),
        ]
    if pngs:
        parts += ["<h2>Curves</h2>", "<p class='muted'>thin: raw; thick: moving average</p>"]
        parts += [img(p) for p in pngs]
    evals = [(lab, r["evals"]) for lab, r in zip(labels, runs) if r["evals"]]
    if evals:
        ekeys: list[str] = []
        for _, ev in evals:
            for e in ev.values():
                ekeys += [k for k in e["summary"] if k not in ekeys]
        erows = []
        for lab, ev in evals:
            for when, e in ev.items():
                erows.append([lab, when, *[e["summary"].get(k) for k in ekeys]])
        parts += ["<h2>Evaluation</h2>", table(["run", "when", *ekeys], erows)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page("posttrain compare", "\n".join(parts)))
    return out


def cli(command: str, argv: list[str]) -> int:
    """`posttrain compare RUN_DIR... [--out FILE] [--metric KEY ...]`."""
    p = argparse.ArgumentParser(
        prog="posttrain compare",
        description="Put several runs on the same axes (a KL or beta sweep) in one HTML page.",
    )
    p.add_argument("run_dirs", nargs="+", help="run directories to compare")
    p.add_argument("--out", help="HTML file to write (default: PARENT/compare.html)")
    p.add_argument(
        "--metric",
        action="append",
        help="a metric to plot and summarise (repeatable; default: all plotted, main ones summarised)",
    )
    a = p.parse_args(argv)
    try:
        path = build_compare(a.run_dirs, a.out, a.metric)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(f"wrote {path}")
    return 0


__all__ = ["build_compare", "cli", "config_differences", "run_labels"]
