"""`posttrain rloo` and `posttrain grpo` through the CLI on the tiny model; resume; reward errors."""

from __future__ import annotations

import math

import pytest
import torch
from rl_fakes import REWARD_PY, use_fake_task
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.rewards import RewardError
from posttrain.runs import read_jsonl


def _args(command, tiny_dir, tmp_path, name, *extra):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    return [
        command,
        "--model.name", str(tiny_dir),
        "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name,
        "--run.progress=false",
        "--run.sample_every=2",
        "--steps=2",
        "--batch_size=2",
        "--samples_per_prompt=3",
        "--optim.lr=1e-2",
        "--eval_limit=0",
        f"--reward.components=python:{reward}:e_rate",
        *extra,
    ]  # fmt: skip


def _train_records(run):
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]


@pytest.mark.parametrize("command", ["rloo", "grpo"])
def test_runs_with_finite_losses_and_changed_weights(command, tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    # grpo: the explicit path (a scoring forward for old_logp, the exact KL logged); rloo: one
    # update per rollout, old_logp = logp.detach(), entropy from the training forward, no exact KL
    extra = (
        ["--update_epochs=2", "--num_minibatches=2", "--exact_kl=true"] if command == "grpo" else []
    )
    assert main(_args(command, tiny_dir, tmp_path, command, *extra)) == 0
    run = tmp_path / "runs" / command
    recs = _train_records(run)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for k in (
            "loss/total",
            "loss/policy",
            "reward/mean",
            "kl/k3",
            "entropy",
            "clip_fraction",
        ):
            assert math.isfinite(r[k]), (k, r)
        assert ("kl/exact" in r) == (command == "grpo")
    if command == "rloo":  # one epoch, one minibatch: exactly on-policy
        assert all(r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in recs)
        assert all(r["clip_fraction"] == 0 for r in recs)
    assert (run / "config.toml").read_text().count("advantage = ") == 1
    samples = read_jsonl(run / "samples.jsonl")
    assert len(samples) == 6 and {"prompt", "completion", "reward", "adv"} <= set(samples[0])
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_grpo_lora_with_adapter_reference(tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    args = _args("grpo", tiny_dir, tmp_path, "lora", "--lora.enabled=true", "--lora.r=4")
    assert main(args + ["--ref=adapter", "--eval_limit=2"]) == 0
    run = tmp_path / "runs" / "lora"
    recs = _train_records(run)
    assert recs[0]["kl/k3"] == pytest.approx(0.0, abs=1e-6)  # adapter B starts at zero
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2]


def test_resume_continues_exactly(tiny_dir, tmp_path, monkeypatch):
    """4 steps in one go == 2 steps, then --run.resume to step 4 (weights, optimizer, RNG,
    prompt cursor and reward normaliser all restored)."""
    use_fake_task(monkeypatch)
    extra = ["--update_epochs=2", "--reward.normalize=true", "--kl_coef=0.1"]
    whole = _args("grpo", tiny_dir, tmp_path, "whole", *extra)
    assert main(whole + ["--steps=4"]) == 0
    part = _args("grpo", tiny_dir, tmp_path, "part", *extra)
    assert main(part) == 0
    run = tmp_path / "runs" / "part"
    assert main(part + ["--steps=4", "--run.resume", str(run)]) == 0
    a, b = _train_records(tmp_path / "runs" / "whole"), _train_records(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("reward/mean", "loss/total", "kl/k3", "reward/running_mean"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_reward_nan_stops_or_is_skipped(tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def r(prompts, completions, batch):\n"
        "    return [float('nan') if i == 1 else 1.0 for i in range(len(completions))]\n"
    )
    args = _args("rloo", tiny_dir, tmp_path, "nan", f"--reward.components=python:{bad}:r")
    with pytest.raises(RewardError, match="sample 1"):
        main(args)
    assert main(args + ["--reward.on_error=skip", "--run.name=skip"]) == 0
    recs = _train_records(tmp_path / "runs" / "skip")
    assert all(r["reward/skipped"] == 1.0 for r in recs)
    assert all(math.isfinite(r["loss/total"]) for r in recs)
