"""`posttrain dpo --sweep.betas=[...]`: one DPO run per beta on the same pairs, then their loss
curves on shared axes (beta_sweep.png) and their final metrics (sweep.json).

    posttrain dpo --config configs/dpo_sentiment.toml --sweep.betas=[0.05,0.1,0.5]
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from posttrain.algos.dpo import Config, train
from posttrain.pair_building import task_chat


def sweep(cfg: Config) -> Path:
    """One run per beta into OUT/<name>/beta_<b>, then beta_sweep.png and sweep.json."""
    from posttrain.runs import read_jsonl

    root = Path(cfg.run.out_dir) / (cfg.run.name or f"dpo-sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    root.mkdir(parents=True, exist_ok=True)
    base = copy.deepcopy(cfg)
    base.sweep.betas = []
    base.run.out_dir = str(root)
    if base.build.enabled:  # sample the pairs once, train every beta on the same file
        b = copy.deepcopy(base)
        b.build.only, b.run.name, b.eval.enabled = True, "pairs", False
        base.data.source = str(train(b) / "pairs.jsonl")
        base.data.chat = base.data.chat or task_chat(base.task)
        base.build.enabled = False
    curves: dict[float, list[dict[str, Any]]] = {}
    for beta in cfg.sweep.betas:
        sub = copy.deepcopy(base)
        sub.beta, sub.run.name = beta, f"beta_{beta:g}"
        path = train(sub)
        curves[beta] = read_jsonl(path / "metrics.jsonl")
        # Later betas start from the same policy on the same pairs: reuse the first run's reference
        # log-probs and its before-training evaluation.
        if (path / "reference_logps.json").is_file():
            base.reference_cache = str(path / "reference_logps.json")
        base.eval.before = False
    summary: dict[str, Any] = {str(b): _final(rows) for b, rows in curves.items()}
    before = [
        r["task/reward"]
        for r in next(iter(curves.values()))
        if r["step"] == 0 and "task/reward" in r
    ]
    if before:
        summary["task/reward_before"] = before[0]
    (root / "sweep.json").write_text(json.dumps(summary, indent=1))
    plot_sweep(curves, root / "beta_sweep.png")
    print(f"beta sweep: {json.dumps(summary)}\nplot: {root / 'beta_sweep.png'}")
    return root


def _final(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("loss", "rewards/accuracy", "rewards/margin", "eval/loss", "eval/rewards/accuracy")
    out: dict[str, Any] = {}
    for r in rows:
        out.update({k: r[k] for k in (*keys, "task/reward") if k in r and r["step"] > 0})
    return out


def plot_sweep(curves: dict[float, list[dict[str, Any]]], path: Path) -> None:
    """Training loss (and held-out loss when logged) per beta on shared axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for beta, rows in curves.items():
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"beta={beta:g} train")[0]
        ev = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        if ev:
            ax.plot(*zip(*ev), "o--", color=line.get_color(), label=f"beta={beta:g} held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("DPO loss")
    ax.set_title("DPO loss by beta")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
