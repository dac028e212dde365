"""The posttrain-vs-TRL harness (bench/trl_compare.py) runs both sides and prints its table.

Speed is not tested here: one warm-up and one timed step on the tiny model, to check that every
side runs, its numbers reach the table, and the ratios are computed the right way round.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import trl_compare  # noqa: E402


def _rows(out: str) -> dict[str, list[str]]:
    """workload -> its cells, from the markdown table in the harness output."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in trl_compare.WORKLOADS:
            rows[cells[0]] = cells
    return rows


def _run(capsys, tiny_dir: Path, workloads: str, sides: str, *extra: str) -> tuple[int, str]:
    # the tiny tokenizer is byte-level: its prompts are longer than 128 tokens
    rc = trl_compare.main(
        [
            "--model",
            str(tiny_dir),
            "--steps",
            "1",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--max-length",
            "512",
            "--workloads",
            workloads,
            "--sides",
            sides,
            *extra,
        ]  # fmt: skip
    )
    return rc, capsys.readouterr().out


def test_table_ratios_are_trl_over_posttrain_for_time():
    """posttrain 1 s/step and TRL 2 s/step -> speed-up 2.00; 100 vs 50 tokens/s -> 2.00;
    RSS 300 vs 600 MB -> 0.50 (posttrain / TRL)."""
    res = [
        {"side": "posttrain", "workload": "grpo", "step_seconds": [1.0, 3.0, 1.0],
         "gen_tokens": 300, "gen_seconds": 3.0, "peak_rss_mb": 300.0},
        {"side": "trl", "workload": "grpo", "step_seconds": [2.0],
         "gen_tokens": 100, "gen_seconds": 2.0, "peak_rss_mb": 600.0},
    ]  # fmt: skip
    out = trl_compare.table(trl_compare.summarize(res), ["grpo"], "test machine", 128)
    cells = _rows(out)["grpo"]
    assert cells[2:5] == ["1.000", "2.000", "2.00"]  # median 1.0 of [1, 3, 1]
    assert cells[5:8] == ["100.0", "50.0", "2.00"]
    assert cells[8:10] == ["100", "100"]  # generated tokens per timed step
    assert cells[10:13] == ["300", "600", "0.50"]


def test_posttrain_side_alone(capsys, tiny_dir):
    """Without TRL the posttrain side still runs (the CLI flags the harness passes stay valid)."""
    rc, out = _run(capsys, tiny_dir, "sft_full", "posttrain")
    assert rc == 0, out
    cells = _rows(out)["sft_full"]
    assert float(cells[2]) > 0 and cells[3] == "-"


def test_posttrain_online_rows_under_bf16(capsys, tiny_dir):
    """grpo (shared prompts, no scoring forward) and ppo 2 x 4 (one forward per rollout) through the
    harness's flags, with --dtype bfloat16 (posttrain's --run.autocast=bfloat16)."""
    rc, out = _run(capsys, tiny_dir, "grpo,ppo_2x4", "posttrain", "--dtype", "bfloat16")
    assert rc == 0, out
    rows = _rows(out)
    assert set(rows) == {"grpo", "ppo_2x4"}
    assert all(float(cells[2]) > 0 for cells in rows.values())
    assert float(rows["grpo"][5]) > 0  # generation tokens/s


@pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="TRL is not installed (it is only a bench extra): pip install -e '.[bench]'",
)
def test_both_sides_print_the_table(capsys, tiny_dir):
    rc, out = _run(capsys, tiny_dir, "sft_lora,rloo", "posttrain,trl")
    assert rc == 0, out
    assert "s/step posttrain" in out and "s/step TRL" in out
    rows = _rows(out)
    assert set(rows) == {"sft_lora", "rloo"}
    for name, cells in rows.items():
        pt, trl, speedup = float(cells[2]), float(cells[3]), float(cells[4])
        assert pt > 0 and trl > 0, name
        # the cells are rounded to 3 decimals (speed-up to 2) from unrounded medians: the ratio
        # of the printed times may differ by that rounding, which matters for the tiny model's
        # few-millisecond steps
        lo, hi = (trl - 5e-4) / (pt + 5e-4), (trl + 5e-4) / max(pt - 5e-4, 1e-9)
        assert lo - 0.005 <= speedup <= hi + 0.005, (name, pt, trl, speedup)
        assert float(cells[10]) > 0 and float(cells[11]) > 0, name  # peak RSS of each side
    assert float(rows["rloo"][5]) > 0 and float(rows["rloo"][6]) > 0  # generation tokens/s
