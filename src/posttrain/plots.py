"""Training curves as PNGs, from a run's metrics.jsonl and nothing else.

    from posttrain.plots import plot_run, plot_compare
    plot_run("runs/grpo-1")                           # runs/grpo-1/plots/*.png
    plot_compare(["runs/kl0.01", "runs/kl0.1"], "cmp")  # several runs on the same axes

A run may log any flat keys. Each key is put in one group by the first of its name parts
(split on "/", "_", ".", "-") that names a group, so `loss/kl` is a loss term, `kl_coef` belongs
with KL and `eval/reward` with the evaluation metrics:

    eval     eval, val, valid, test          time     time, seconds, sec, duration, elapsed
    lr       lr, learning_rate               loss     loss, losses, nll
    kl       kl                              reward   reward, rewards, score, scores, accuracy
    entropy  entropy                         length   len, length, lengths, tokens
    other    everything else that is a number (grad_norm, clip_frac, ...)

One PNG per group that has data, one panel per key, the raw values thin and an exponential moving
average (debiased, as in TensorBoard) on top; by default its weight follows the run's length
(`auto_smoothing`: about a tenth of the steps, at most 0.9). Step-time components (time/generate, time/score,
time/train, ...) also get a stacked panel showing where each step's seconds went.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from posttrain.runs import read_jsonl

# group name -> (title, name parts that select it); the order is the order of the PNGs
GROUPS: dict[str, tuple[str, frozenset[str]]] = {
    "reward": ("Reward", frozenset({"reward", "rewards", "score", "scores", "accuracy", "acc"})),
    "kl": ("KL divergence", frozenset({"kl"})),
    "loss": ("Loss terms", frozenset({"loss", "losses", "nll"})),
    "entropy": ("Entropy", frozenset({"entropy"})),
    "length": ("Lengths and token counts", frozenset({"len", "length", "lengths", "tokens"})),
    "lr": ("Learning rate", frozenset({"lr", "learning_rate"})),
    "time": (
        "Step time (seconds)",
        frozenset({"time", "seconds", "sec", "secs", "duration", "elapsed"}),
    ),
    "eval": ("Evaluation", frozenset({"eval", "val", "valid", "validation", "test"})),
    "other": ("Other metrics", frozenset()),
}
# first matching part wins, but these groups are checked first when their part appears anywhere:
# `eval/loss` is an evaluation metric, `time/kl` a time
_PRIORITY = ("eval", "time")
_SPLIT = re.compile(r"[/_.\-]+")
# keys that are bookkeeping, not curves
SKIP = frozenset({"step", "epoch_step", "timestamp", "wall_time"})


def key_parts(key: str) -> list[str]:
    """'time/generate_s' -> ['time', 'generate', 's']; 'learning_rate' also gives 'learning_rate'."""
    parts = [p for p in _SPLIT.split(key.lower()) if p]
    if "learning_rate" in key.lower():
        parts.insert(0, "learning_rate")
    return parts


def group_of(key: str) -> str:
    """The group a metric name belongs to (see the module docstring)."""
    parts = key_parts(key)
    if len(parts) >= 2 and parts[-2:] in (["per", "s"], ["per", "sec"], ["per", "second"]):
        return "other"  # throughput such as tokens_per_s: neither a length nor a time
    for g in _PRIORITY:
        if any(p in GROUPS[g][1] for p in parts):
            return g
    for p in parts:
        for g, (_, names) in GROUPS.items():
            if p in names:
                return g
    return "other"


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    v = float(v)
    return v if math.isfinite(v) and abs(v) < 1e300 else None


def series(records: Iterable[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (steps, values) for every numeric key; missing, non-numeric and non-finite skipped."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, rec in enumerate(records):
        step = _number(rec.get("step", i))
        step = float(i) if step is None else step
        for k, v in rec.items():
            x = _number(v)
            if k in SKIP or x is None:
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(step)
            ys.append(x)
    return out


def logged_once(records: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """key -> (step, value) for the numeric keys logged at one step only (shown as numbers)."""
    return {k: (xs[0], ys[0]) for k, (xs, ys) in series(records).items() if len(xs) == 1}


def group_metrics(keys: Iterable[str]) -> dict[str, list[str]]:
    """Group name -> its keys (in first-seen order), groups in GROUPS order, empty ones left out."""
    found: dict[str, list[str]] = {g: [] for g in GROUPS}
    for k in keys:
        if k not in SKIP:
            found[group_of(k)].append(k)
    return {g: ks for g, ks in found.items() if ks}


def ema(values: Sequence[float], smoothing: float = 0.9) -> list[float]:
    """Debiased exponential moving average: m_t = s m_{t-1} + (1 - s) x_t, divided by 1 - s^t.

    The debiasing makes the first point equal to the first value instead of pulling it to zero.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = smoothing * m + (1 - smoothing) * x
        out.append(m / (1 - smoothing**t))
    return out


def _time_components(keys: list[str]) -> list[str]:
    """Time keys that are parts of a step (not its total), for the stacked panel."""
    return [k for k in keys if not ({"total", "step", "elapsed"} & set(key_parts(k)))]


def _figure(n_panels: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    fig.suptitle(title)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n_panels:]:
        ax.set_visible(False)
    return fig, flat[:n_panels]


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def auto_smoothing(n: int) -> float:
    """EMA weight averaging over about a tenth of the run: 0 below 11 points, 0.9 from 100 on."""
    return min(0.9, max(0.0, 1 - 10 / max(n, 1)))


def _axes_style(ax: Any, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _curve(
    ax: Any, xs: list[float], ys: list[float], smoothing: float | None, **style: Any
) -> None:
    """Raw values thin and faint, the EMA on top (when there are enough points to smooth)."""
    color = style.pop("color", None)
    label = style.pop("label", None)
    smoothing = auto_smoothing(len(ys)) if smoothing is None else smoothing
    if len(ys) >= 3 and smoothing > 0:
        (raw,) = ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
        ax.plot(xs, ema(ys, smoothing), color=raw.get_color(), linewidth=1.8, label=label)
    else:
        ax.plot(xs, ys, color=color, marker="o", markersize=3, linewidth=1.2, label=label)


def plot_records(
    records: list[dict[str, Any]],
    out_dir: str | Path,
    smoothing: float | None = None,
    title: str = "",
) -> list[Path]:
    """One PNG per metric group into out_dir; returns their paths (empty when nothing to plot)."""
    out = Path(out_dir)
    data = {k: v for k, v in series(records).items() if len(v[0]) > 1}  # once: a number, no plot
    groups = group_metrics(data)
    if not groups:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for g, keys in groups.items():
        parts = _time_components(keys) if g == "time" else []
        stacked = len(parts) >= 2
        fig, axes = _figure(len(keys) + stacked, f"{title}  {GROUPS[g][0]}".strip())
        for ax, k in zip(axes, keys):
            xs, ys = data[k]
            _curve(ax, xs, ys, smoothing)
            _axes_style(ax, k)
            if g == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if stacked:
            _stacked_time(axes[-1], data, parts)
        paths.append(_save(fig, out / f"{g}.png"))
    return paths


def _stacked_time(ax: Any, data: dict[str, tuple[list[float], list[float]]], keys: list[str]):
    """Seconds per step split by component, on the steps where every component was logged."""
    steps = sorted(set.intersection(*(set(data[k][0]) for k in keys)))
    if not steps:
        ax.set_visible(False)
        return
    cols = []
    for k in keys:
        lookup = dict(zip(*data[k]))
        cols.append([lookup[s] for s in steps])
    ax.stackplot(steps, cols, labels=keys, alpha=0.8)
    _axes_style(ax, "where each step's seconds go")
    ax.legend(fontsize=7, loc="upper left")


def plot_run(
    run_dir: str | Path, out_dir: str | Path | None = None, smoothing: float | None = None
):
    """Plot a run directory's metrics.jsonl into out_dir (default RUN_DIR/plots)."""
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{str(run)!r} has no metrics.jsonl: is it a run directory?")
    return plot_records(read_jsonl(run / "metrics.jsonl"), out_dir or run / "plots", smoothing)


def plot_compare(
    runs: dict[str, list[dict[str, Any]]],
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    smoothing: float | None = None,
) -> list[Path]:
    """Several runs (label -> metrics records) on shared axes: one PNG per group, a line per run.

    `metrics` restricts the plot to those keys; by default every key that some run logged.
    """
    out = Path(out_dir)
    data = {label: series(recs) for label, recs in runs.items()}
    keys: list[str] = []
    for d in data.values():
        keys += [k for k in d if k not in keys]
    if metrics:
        missing = [m for m in metrics if m not in keys]
        if missing:
            raise ValueError(f"no run logged {missing}; logged keys: {sorted(keys)}")
        keys = list(metrics)
    groups = group_metrics(keys)
    if not groups:
        return []
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    colors = matplotlib.colormaps["tab10"].colors
    paths = []
    for g, gkeys in groups.items():
        fig, axes = _figure(len(gkeys), GROUPS[g][0])
        for ax, k in zip(axes, gkeys):
            for i, (label, d) in enumerate(data.items()):
                if k in d:
                    _curve(ax, *d[k], smoothing, color=colors[i % len(colors)], label=label)
            _axes_style(ax, k)
        axes[0].legend(fontsize=7)
        paths.append(_save(fig, out / f"{g}.png"))
    return paths


__all__ = [
    "GROUPS",
    "ema",
    "group_metrics",
    "group_of",
    "logged_once",
    "plot_compare",
    "plot_records",
    "plot_run",
]
