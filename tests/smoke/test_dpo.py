"""`posttrain dpo` through the CLI on the tiny model: reference modes, LoRA, resume, beta sweep."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.cli import main
from posttrain.runs import read_jsonl

GOOD = [" great fun", " a wonderful story", " good actors", " fun and great"]
BAD = [" terrible", " boring and bad", " a bad ending", " terrible boring"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {"prompt": f"The movie {i} was", "chosen": GOOD[i % 4], "rejected": BAD[i % 4]}
        for i in range(10)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dpo(tiny_dir, pairs, out, name, *extra):
    args = [
        "dpo",
        "--model.name", str(tiny_dir),
        "--data.source", str(pairs),
        "--data.eval_fraction=0.2",
        "--run.out_dir", str(out),
        "--run.name", name,
        "--run.progress=false",
        "--batch_size=2",
        "--optim.lr=1e-3",
        *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return out / name


def test_dpo_full_precomputed(tiny_dir, pairs, tmp_path):
    run = _dpo(tiny_dir, pairs, tmp_path, "full", "--max_steps=3")
    rows = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "seconds"):  # fmt: skip
        assert all(math.isfinite(r[key]) for r in steps), key
    assert "eval/loss" in rows[-1] and "eval/rewards/accuracy" in rows[-1]
    refs = json.loads((run / "reference_logps.json").read_text())
    assert len(refs["train"]) == 8 and len(refs["eval"]) == 2
    assert (run / "final" / "config.json").is_file()
    # the weights moved
    from posttrain.models import load_model

    before, _ = load_model(str(tiny_dir))
    after, _ = load_model(str(run / "final"))
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)


def test_dpo_lora_adapter_disabled_and_frozen_copy(tiny_dir, pairs, tmp_path):
    """Under LoRA only the adapter trains; the adapter-off reference and a frozen copy start at
    the same log 2 loss as the precomputed one, and IPO runs on the same data."""
    run = _dpo(tiny_dir, pairs, tmp_path, "lora", "--max_steps=2", "--lora.enabled=true",
               "--lora.r=4", "--reference=adapter_disabled")  # fmt: skip
    first = read_jsonl(run / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert (run / "final" / "adapter_config.json").is_file()
    assert not (run / "reference_logps.json").exists()
    run = _dpo(tiny_dir, pairs, tmp_path, "copy", "--max_steps=1", "--reference=frozen_copy",
               "--loss_type=ipo")  # fmt: skip
    # IPO at the start: h = 0, loss = (0 - 1 / (2 * 0.1))^2 = 25
    assert read_jsonl(run / "metrics.jsonl")[0]["loss"] == pytest.approx(25.0, abs=1e-3)


@pytest.fixture
def accelerate_bf16(monkeypatch):
    """accelerate's bf16 mixed precision (configs/accelerate/ddp.yaml's), here on the CPU: only
    the prepared module's forward runs in autocast."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)  # the state is a process-wide singleton
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("reference", ["precomputed", "frozen_copy"])
def test_reference_runs_in_the_policys_precision(
    tiny_dir, pairs, tmp_path, accelerate_bf16, reference
):
    """At the first step the policy is the reference: log pi - log ref is 0 for every pair, so
    the implicit rewards and their margin are 0, when the reference passes run in the policy's
    bf16 autocast (in fp32 they differ by bf16 rounding, ~1e-2)."""
    run = _dpo(tiny_dir, pairs, tmp_path, reference, "--max_steps=1", f"--reference={reference}",
               "--data.eval_fraction=0", "--eval_batch_size=2")  # fmt: skip
    first = read_jsonl(run / "metrics.jsonl")[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert abs(first[key]) < 1e-6, (key, first)


def test_dpo_overfits_four_pairs(tiny_dir, pairs, tmp_path):
    run = _dpo(tiny_dir, pairs, tmp_path, "overfit", "--data.limit=4", "--data.eval_fraction=0",
               "--batch_size=4", "--max_steps=8", "--optim.lr=3e-3", "--beta=0.5")  # fmt: skip
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]


def test_dpo_resume_is_exact(tiny_dir, pairs, tmp_path):
    """Stopping after step 2 and resuming gives the metrics of an uninterrupted 4-step run."""
    common = ["--optim.grad_accum=2", "--batch_size=1", "--run.save_every=2"]
    full = _dpo(tiny_dir, pairs, tmp_path, "whole", "--max_steps=4", *common)
    part = _dpo(tiny_dir, pairs, tmp_path, "part", "--max_steps=2", *common)
    _dpo(tiny_dir, pairs, tmp_path, "part", "--max_steps=4", f"--run.resume={part}", *common)
    a = [r for r in read_jsonl(full / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(part / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["rewards/margin"] == pytest.approx(ra["rewards/margin"], abs=1e-6)


def test_beta_sweep_writes_runs_and_plot(tiny_dir, pairs, tmp_path):
    _dpo(tiny_dir, pairs, tmp_path, "sweep", "--max_steps=2", "--sweep.betas=[0.1,0.5]")
    root = tmp_path / "sweep"
    assert (root / "beta_0.1" / "metrics.jsonl").is_file()
    assert (root / "beta_0.5" / "metrics.jsonl").is_file()
    assert (root / "beta_sweep.png").stat().st_size > 1000
    summary = json.loads((root / "sweep.json").read_text())
    assert set(summary) == {"0.1", "0.5"} and "eval/loss" in summary["0.5"]
    # the second beta reuses the first run's reference log-probs instead of recomputing them
    first, second = (root / f"beta_{b}" / "reference_logps.json" for b in ("0.1", "0.5"))
    assert first.read_text() == second.read_text()


def test_bad_input_is_a_clear_error(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}) + "\n")
    code = main(["dpo", "--model.name", str(tiny_dir), "--data.source", str(bad),
                 "--data.eval_fraction=0", "--run.out_dir", str(tmp_path)])  # fmt: skip
    assert code == 2
    assert "chosen == rejected" in capsys.readouterr().err
    code = main(["dpo", "--reference=adapter_disabled", "--run.out_dir", str(tmp_path)])
    assert code == 2


def test_dpo_builds_pairs_from_a_task_and_evaluates(tiny_dir, tmp_path):
    """--build.enabled samples pairs from the policy and the task reward (unit conversion here:
    its prompts use the chat template, so training switches data.chat on), and --eval.enabled
    logs the task reward before (step 0) and after training."""
    run = _dpo(tiny_dir, "unused.jsonl", tmp_path, "built", "--build.enabled=true",
               "--task.name=unit_conversion", "--build.prompts=6", "--build.n=3",
               "--build.min_gap=-1", "--build.max_new_tokens=6", "--eval.enabled=true",
               "--eval_limit=3", "--eval.max_new_tokens=6", "--data.eval_fraction=0",
               "--max_steps=1")  # fmt: skip
    pairs = read_jsonl(run / "pairs.jsonl")
    assert len(pairs) >= 2 and all(p["score_chosen"] >= p["score_rejected"] for p in pairs)
    assert json.loads((run / "pairs_stats.json").read_text())["samples"] == 18
    rows = read_jsonl(run / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "task/reward" in rows[0]
    assert rows[-1]["step"] == 1 and "task/reward" in rows[-1]
    after = json.loads((run / "eval_after.json").read_text())["summary"]
    assert after["task/reward"] == rows[-1]["task/reward"] and (run / "eval_before.json").is_file()
    from posttrain.algos.dpo import Config
    from posttrain.config import load_config

    saved = load_config(Config, run / "config.toml")
    assert saved.build.enabled and saved.task.name == "unit_conversion"
