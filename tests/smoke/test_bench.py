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
            "--rounds",
            "1",
            "--quiet-wait",
            "0",
            *extra,
        ]  # fmt: skip
    )
    return rc, capsys.readouterr().out


def _res(side, name, rnd, steps, **kw):
    return {"side": side, "workload": name, "round": rnd, "step_seconds": steps,
            "gen_tokens": kw.get("gen_tokens", 0), "gen_seconds": kw.get("gen_seconds", 0.0),
            "peak_rss_mb": kw.get("rss", 100.0), "first_step": kw.get("first", {}),
            "step_tokens": kw.get("tokens", []), "others_load": kw.get("load", 0.0)}  # fmt: skip


def test_table_ratios_are_trl_over_posttrain_per_round():
    """Round 0: posttrain median 1.0 s (of 1, 3, 1), TRL 2.0 -> 2.00; round 1: 2.0 vs 3.0 -> 1.50;
    round 2: 1.0 vs 4.0 -> 4.00: median 2.00, spread 1.50-4.00. Tokens per step are the timed
    steps' (the warm-up's 999 is left out)."""
    res = [
        _res("posttrain", "grpo", 0, [1.0, 3.0, 1.0], gen_tokens=300, gen_seconds=3.0, rss=300.0,
             tokens=[[999, 999], [10, 8], [10, 8], [10, 8]]),
        _res("trl", "grpo", 0, [2.0], gen_tokens=100, gen_seconds=2.0, rss=600.0,
             tokens=[[999, 999], [12, 8]], load=0.25),
        _res("posttrain", "grpo", 1, [2.0]), _res("trl", "grpo", 1, [3.0]),
        _res("posttrain", "grpo", 2, [1.0]), _res("trl", "grpo", 2, [4.0]),
    ]  # fmt: skip
    out = trl_compare.table(trl_compare.summarize(res), ["grpo"], "test machine", 128)
    cells = _rows(out)["grpo"]
    assert cells[4] == "2.00 [1.50-4.00]" and cells[5] == "3"
    assert cells[6] == "n/a (sampled)"
    assert cells[7] == "10/8" and cells[8] == "12/8"
    assert cells[11] == "300/600" and cells[12] == "0.25"


def test_a_failed_round_does_not_hide_the_rounds_that_ran():
    res = [{"side": "trl", "workload": "grpo", "round": 0, "error": "rc=1"},
           _res("trl", "grpo", 1, [2.0]), _res("posttrain", "grpo", 1, [1.0])]  # fmt: skip
    cells = _rows(trl_compare.table(trl_compare.summarize(res), ["grpo"], "m", 128))["grpo"]
    assert cells[3] == "2.000" and cells[4] == "2.00 [2.00-2.00]" and cells[5] == "1"


def test_sft_row_refused_when_first_step_loss_differs():
    """Equal work: SFT/DPO rows print a speed-up only when the first step's loss agrees to 1e-4."""
    same = [_res("posttrain", "sft_full", 0, [1.0], first={"loss": 2.0}),
            _res("trl", "sft_full", 0, [2.0], first={"loss": 2.0001})]  # fmt: skip
    cells = _rows(trl_compare.table(trl_compare.summarize(same), ["sft_full"], "m", 128))
    assert cells["sft_full"][4] == "2.00 [2.00-2.00]"
    apart = [_res("posttrain", "sft_full", 0, [1.0], first={"loss": 2.0}),
             _res("trl", "sft_full", 0, [2.0], first={"loss": 2.01})]  # fmt: skip
    cells = _rows(trl_compare.table(trl_compare.summarize(apart), ["sft_full"], "m", 128))
    assert cells["sft_full"][4] == "refused: unequal work"
    assert "loss 2/2.01" in cells["sft_full"][6]
    none = [_res("posttrain", "dpo_full", 0, [1.0]), _res("trl", "dpo_full", 0, [2.0])]
    cells = _rows(trl_compare.table(trl_compare.summarize(none), ["dpo_full"], "m", 128))
    assert cells["dpo_full"][4] == "refused: unequal work"


def test_posttrain_side_alone(capsys, tiny_dir):
    """Without TRL the posttrain side still runs (the CLI flags the harness passes stay valid)."""
    rc, out = _run(capsys, tiny_dir, "sft_full", "posttrain")
    assert rc == 0, out
    cells = _rows(out)["sft_full"]
    assert float(cells[2]) > 0 and cells[3] == "-"
    padded, real = (int(x) for x in cells[7].split("/"))
    assert padded >= real > 0  # the training forwards' tokens were counted


def test_posttrain_online_rows_under_bf16(capsys, tiny_dir):
    """grpo (shared prompts, no scoring forward) and ppo (a separate value model, the reward model
    that the parent saves) through the harness's flags, with --dtype bfloat16 (posttrain's
    --run.autocast=bfloat16)."""
    rc, out = _run(capsys, tiny_dir, "grpo,ppo", "posttrain", "--dtype", "bfloat16")
    assert rc == 0, out
    rows = _rows(out)
    assert set(rows) == {"grpo", "ppo"}
    assert all(float(cells[2]) > 0 for cells in rows.values())
    assert float(rows["grpo"][10].split("/")[0]) > 0  # generation tokens/s


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
        pt, trl = float(cells[2]), float(cells[3])
        assert pt > 0 and trl > 0, name
        assert cells[5] == "1", name  # one round with both sides
        rss = [float(x) for x in cells[11].split("/")]
        assert min(rss) > 0, name  # peak RSS of each side
    assert not rows["sft_lora"][4].startswith("refused"), rows["sft_lora"]
    assert all(float(x) > 0 for x in rows["rloo"][10].split("/"))  # generation tokens/s


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is not installed")
def test_equal_work_on_the_tiny_model(capsys, tiny_dir):
    """Both sides read the same rows in the same order and compute the same first-step SFT loss
    and DPO log-probs (relative 1e-4), chat-templated and plain; same padded/real tokens."""
    rc, out = _run(capsys, tiny_dir, "sft_full,dpo_full,sft_full_plain,dpo_full_plain",
                   "posttrain,trl")  # fmt: skip
    assert rc == 0, out
    for name, cells in _rows(out).items():
        assert not cells[4].startswith("refused"), (name, cells[6])
        assert "loss" in cells[6], name


def test_row_limit_by_hand():
    """The limit of an SFT row: 6 FLOPs per weight and real token plus causal attention, at the
    fp32 peak; LoRA counts 4; % of limit = limit seconds / measured seconds."""
    from limits import ModelCounts, Peaks

    peaks = Peaks(fp32_gflops=100.0, bf16_gflops=200.0, read_gbs=10.0, cpu="test", threads=1)
    counts = ModelCounts(matmul_params=1000, total_params=1100, norm_params=100, layers=2,
                         hidden=16, attn_width=16, kv_width=8)  # fmt: skip
    side = {"real_step": 1000.0, "padded_step": 1200.0}
    # rows 8, width 1200 / 8 = 150: causal context (150 + 1) / 2 = 75.5 keys per query
    # forward per token 2 * 1000 + 4 * 2 * 16 * 75.5 = 11664; training x3 x 1000 tokens
    want = 3 * 11664 * 1000 / 100e9
    sft = trl_compare.WORKLOADS["sft_full"]
    assert trl_compare.row_limit(sft, [side, side], peaks, counts, "float32") == pytest.approx(want)
    lora = trl_compare.WORKLOADS["sft_lora"]
    got = trl_compare.row_limit(lora, [side], peaks, counts, "float32")
    assert got == pytest.approx(want * 2 / 3)
    res = [_res("posttrain", "sft_full", 0, [want * 2], tokens=[[0, 0], [1200, 1000]]),
           _res("trl", "sft_full", 0, [want * 4], tokens=[[0, 0], [1200, 1000]])]  # fmt: skip
    out = trl_compare.table(trl_compare.summarize(res), ["sft_full"], "m", 128,
                            (peaks, counts, "float32"))  # fmt: skip
    assert _rows(out)["sft_full"][14] == "50%/25%"


@pytest.mark.skipif(
    trl_compare.trl_python(trl_compare.WORKLOADS["ppo"]) is None,
    reason="TRL 1.12's venv is not built (make bench-trl112-venv)",
)
def test_ppo_against_trl_112_ppo(capsys, tiny_dir):
    """The ppo row's TRL side runs TRL 1.12's PPOTrainer from bench/.venv-trl112; both sides train
    a separate value model (the tokens of two training forwards per sequence)."""
    rc, out = _run(capsys, tiny_dir, "ppo", "posttrain,trl")
    assert rc == 0, out
    cells = _rows(out)["ppo"]
    assert cells[1] == "PPOTrainer (TRL 1.12.0)"
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5] == "1"
    assert all(float(x) > 0 for x in cells[10].split("/"))  # generation tokens/s


def test_profile_decoder_runs(capsys, tiny_dir, monkeypatch):
    """bench/profile_decoder.py prints a row per rows x dtype on the tiny model (no timing checked:
    the products' share is only a difference of two medians)."""
    spec = importlib.util.spec_from_file_location("profile_decoder", BENCH / "profile_decoder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["profile_decoder.py", "--model", str(tiny_dir), "--threads", "1", "--rows", "2,3",
            "--dtypes", "float32,bfloat16", "--prompt-tokens", "5", "--steps", "3"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1:3] for r in rows[1:]] == [
        [" 2 ", " float32 "], [" 2 ", " bfloat16 "], [" 3 ", " float32 "], [" 3 ", " bfloat16 "]
    ]  # fmt: skip


def test_generation_bench_rows(capsys, tiny_dir, monkeypatch):
    """bench/generation.py on the tiny model: the sequential base once, then a row per batching
    x batch size, each with the tokens it sampled and its tokens/s."""
    spec = importlib.util.spec_from_file_location("generation_bench", BENCH / "generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["generation.py", "--model", str(tiny_dir), "--threads", "1", "--prompts", "5",
            "--new-tokens", "4", "--batches", "1,2", "--batching", "continuous,micro",
            "--tool-rows", "false", "--no-limits"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in r.split("|")[1:-1]] for r in rows[1:]]
    assert [c[:3] for c in cells] == [
        ["sequential", "float32", "1"],
        ["batched, continuous", "float32", "2"],
        ["batched, micro", "float32", "2"],
    ]
    assert all(int(c[3]) > 0 and float(c[5]) > 0 for c in cells)  # tokens, tokens/s


def test_generation_limit_counts_a_shared_start_and_each_prompt_once():
    """bench/generation.py's limit prefills what must be prefilled: the start common to all
    prompts once, each distinct prompt's other tokens once (its samples share them)."""
    import types

    import torch

    spec = importlib.util.spec_from_file_location("generation_bench", BENCH / "generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    roll = types.SimpleNamespace(
        prompt_ids=torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 9, 10], [0, 5, 6, 7, 8]]),
        prompt_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]),
        prompt_index=torch.tensor([0, 1, 0]),  # rows 0 and 2: two samples of one prompt
    )
    # [5, 6, 7] once, then 8 and 9, 10: 3 + 1 + 2
    assert mod.prefill_tokens(roll) == 6
    one = types.SimpleNamespace(prompt_ids=roll.prompt_ids[:1], prompt_mask=roll.prompt_mask[:1],
                                prompt_index=torch.tensor([0]))  # fmt: skip
    assert mod.prefill_tokens(one) == 4


@pytest.mark.parametrize("workload", ["ppo_plain", "grpo"])
def test_profile_step_times_each_phase(tiny_dir, workload):
    """bench/profile_step.py runs the harness's posttrain command (its prompts, order and, for
    ppo, reward model) with a timer on each phase, and every phase it names is one the step ran
    (a renamed function would leave its phase out; a missing one fails here)."""
    import os
    import subprocess

    out = subprocess.run(
        [sys.executable, str(BENCH / "profile_step.py"), workload, "--model", str(tiny_dir),
         "--steps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    phases = {ln.strip().split("  ")[0] for ln in out.stdout.splitlines() if ln.startswith("  ")}
    want = {"sampling + reward", "generation (whole call)", "decode steps", "prefill",
            "lean decoder build (weights reordered)", "backward", "optimizer (clip + AdamW)",
            "STEP (end to end)"}  # fmt: skip
    if workload == "ppo_plain":
        want |= {"value model forward (ppo)", "policy forward (ppo)"}
    else:
        want |= {"policy forward (training)"}
    assert want <= phases, sorted(phases)
