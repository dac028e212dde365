"""Preference pairs built from a policy and a reward, and the pairs a command trains on.

`build_pairs` makes pairs from a policy and a reward: n >= 2 samples per prompt, scored, the best
and the worst kept when their score gap exceeds `min_gap`. Commands reach it with `--build.enabled`
through `pair_records`, which otherwise reads the records of `data.source` (`preferences`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.preferences import (
    BuildConfig,
    PairsConfig,
    Record,
    RewardFn,
    load_records,
    split_records,
    write_jsonl,
)
from posttrain.rollout import GenerationConfig
from posttrain.tools import Toolbox


def build_pairs(
    model: Any,
    tok: Any,
    rows: list[Record],
    reward_fn: RewardFn,
    gen: GenerationConfig,
    *,
    min_gap: float,
    pairs_per_prompt: int = 1,
    progress: bool = False,
    tools: Toolbox | None = None,
) -> tuple[list[Record], dict[str, float]]:
    """Sample gen.n >= 2 completions per row["prompt"], score them, keep (best, worst) pairs.

    reward_fn(prompts, completions, batch) -> (B,) tensor or list, with the rows' other fields as a
    columnar batch (the task reward signature). A pair is kept when best - worst > min_gap and the
    two texts differ. With pairs_per_prompt = m > 1 the samples sorted by score also give the
    pairs (2nd best, 2nd worst), ... up to m disjoint pairs (no sample is used twice), each
    checked the same way. With `tools` the policy may call them while it samples; a record then
    lists each completion's calls (chosen_tool_calls, rejected_tool_calls). Returns (records, stats).
    """
    from posttrain.rollout import generate
    from posttrain.tasks.base import columns

    if gen.n < 2:
        raise ConfigError("building pairs needs at least 2 samples per prompt (build.n >= 2)")
    if pairs_per_prompt < 1 or 2 * pairs_per_prompt > gen.n:
        raise ConfigError(
            f"build.pairs_per_prompt={pairs_per_prompt} needs 1 <= pairs_per_prompt <= n // 2 "
            f"(n={gen.n}): each pair takes two distinct samples"
        )
    prompts = [r["prompt"] for r in rows]
    ro = generate(model, tok, prompts, gen, progress=progress, tools=tools)
    rep = [rows[i] for i in ro.prompt_index.tolist()]
    scores = reward_fn([r["prompt"] for r in rep], ro.completions, columns(rep))
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten().cpu()  # (B * n,)
    if scores.shape[0] != len(ro.completions):
        raise ValueError(f"reward returned {scores.shape[0]} scores for {len(ro)} completions")
    records: list[Record] = []
    gaps: list[float] = []
    skipped: Counter = Counter()
    for i, row in enumerate(rows):
        s = scores[i * gen.n : (i + 1) * gen.n]
        texts = ro.completions[i * gen.n : (i + 1) * gen.n]
        order = torch.sort(s, stable=True).indices  # ties: best and worst are still two samples
        for j in range(pairs_per_prompt):
            best, worst = int(order[-1 - j]), int(order[j])
            gap = float(s[best] - s[worst])
            if gap <= min_gap:
                skipped["gap too small"] += 1
            elif texts[best].strip() == texts[worst].strip() or not (
                texts[best].strip() and texts[worst].strip()
            ):
                skipped["identical or empty text"] += 1
            else:
                rec = {
                    "prompt": row["prompt"],
                    "chosen": texts[best],
                    "rejected": texts[worst],
                    "score_chosen": float(s[best]),
                    "score_rejected": float(s[worst]),
                }
                if tools is not None:
                    for key, j in (("chosen", best), ("rejected", worst)):
                        rec[f"{key}_tool_calls"] = ro.tool_records(i * gen.n + j)
                records.append(rec)
                gaps.append(gap)
    stats = {
        "prompts": float(len(rows)),
        "samples": float(len(ro)),
        "pairs": float(len(records)),
        "mean_reward": float(scores.mean()),
        "mean_gap": float(sum(gaps) / len(gaps)) if gaps else math.nan,
        "seconds": ro.seconds,
        **{f"skipped: {k}": float(v) for k, v in skipped.items()},
    }
    return records, stats


def build_from_task(
    model: Any,
    tok: Any,
    task_cfg: Any,
    build: BuildConfig,
    progress: bool = False,
    tools: Toolbox | None = None,
) -> tuple[list[Record], dict[str, float], GenerationConfig]:
    """build_pairs over the first build.prompts rows of the task's train split, with its reward
    (the policy calling `tools`, if any)."""
    import dataclasses

    from posttrain.tasks import load_task

    task = load_task(task_cfg)
    rows = task.rows("train")[: build.prompts]
    if not rows:
        raise ConfigError(f"task {task_cfg.name!r} has no train rows to build pairs from")
    gen = dataclasses.replace(task.generation(), n=build.n, temperature=build.temperature)
    if build.max_new_tokens:
        gen.max_new_tokens = build.max_new_tokens
    records, stats = build_pairs(
        model,
        tok,
        rows,
        task.reward,
        gen,
        min_gap=build.min_gap,
        pairs_per_prompt=build.pairs_per_prompt,
        progress=progress,
        tools=tools,
    )
    if not records:
        raise ConfigError(
            f"no pairs from {len(rows)} prompts (n={build.n}, min_gap={build.min_gap}): "
            f"{stats}; lower build.min_gap or raise build.n / build.temperature"
        )
    return records, stats, gen


def pair_records(
    cfg: Any, run_path: Path, model: Any = None, tok: Any = None, tools: Toolbox | None = None
) -> tuple[list[Record], list[Record]]:
    """(train, held-out) records for a command with `data`, `build`, `task` and `run` sections.

    With build.enabled the pairs are sampled from `model` (or build.model), calling `tools` if
    any, and written to RUN/pairs.jsonl; on resume that file is read back instead of sampling again.
    """
    data: PairsConfig = cfg.data
    if cfg.build.enabled:
        path = run_path / "pairs.jsonl"
        if not path.is_file():
            if model is None or cfg.build.model:
                from posttrain.models import load_model

                name = cfg.build.model or cfg.model.name
                model, tok = load_model(name, device=cfg.model.device, onednn=cfg.run.onednn)
            records, stats, gen = build_from_task(
                model, tok, cfg.task, cfg.build, progress=cfg.run.progress, tools=tools
            )
            write_jsonl(path, records)
            (run_path / "pairs_stats.json").write_text(json.dumps(stats, indent=1))
            print(f"built {len(records)} pairs -> {path} {stats}", flush=True)
        data.chat = data.chat or task_chat(cfg.task)
        records = load_records(data, str(path), "train")
    else:
        records = load_records(data)
    # each record keeps its row in the file: errors name it after the split has moved it
    records = [{**r, "row": i} for i, r in enumerate(records)]
    if data.eval_source:
        held = load_records(data, data.eval_source, data.eval_split)
        return records, [{**r, "row": i} for i, r in enumerate(held)]
    return split_records(records, data.eval_fraction, cfg.run.seed)


def task_chat(task_cfg: Any) -> bool:
    """Whether the task samples with the chat template (pairs built from it must train with it)."""
    from posttrain.tasks import load_task

    return bool(load_task(task_cfg).generation().chat)
