"""`posttrain reinforce` through the CLI on the tiny model with a fake task and a file reward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rl_fakes import REWARD_PY, use_fake_task
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.runs import read_jsonl


def _args(tiny_dir, tmp_path, name, *extra):
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    return [
        "reinforce",
        "--model.name", str(tiny_dir),
        "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name,
        "--run.progress=false",
        "--run.sample_every=1",
        "--steps=3",
        "--batch_size=4",
        "--optim.lr=1e-2",
        "--eval_limit=2",
        f"--reward.components=python:{reward}:e_rate",
        *extra,
    ]  # fmt: skip


VARIANTS = {
    # the policy's scoring pass and the exact KL on
    "kl_in_reward": ["--kl_coef=0.1", "--exact_kl=true"],
    # the reference's pass only; 2 samples per prompt: each prompt runs once per forward
    "kl_in_loss": [
        "--kl_coef=0.1",
        "--kl_in=loss",
        "--kl_estimator=k3",
        "--baseline=none",
        "--samples_per_prompt=2",
    ],
    "no_kl": ["--kl_coef=0", "--baseline=mean"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reinforce_runs_and_changes_weights(variant, tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    args = _args(tiny_dir, tmp_path, "r", "--optim.grad_accum=2", *VARIANTS[variant])
    assert main(args) == 0
    run = tmp_path / "runs" / "r"
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    keys = ["loss/total", "loss/policy", "reward/mean", "reward/e_rate", "entropy", "grad_norm"]
    if variant != "no_kl":
        keys += ["kl/k1", "kl/k3"]
    if variant == "kl_in_reward":
        keys += ["kl/exact"]
    if variant == "kl_in_loss":
        keys += ["loss/kl"]
    for r in recs:
        for k in keys:
            assert math.isfinite(r[k]), (k, r)
        assert r["time/generate"] > 0 and r["entropy"] > 0
        assert ("kl/exact" in r) == (variant == "kl_in_reward")
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 3]
    for when, rec in (("before", evals[0]), ("after", evals[-1])):  # the report's before/after
        saved = json.loads((run / f"eval_{when}.json").read_text())
        assert saved["summary"]["reward"] == rec["eval/reward"]
    assert len(read_jsonl(run / "samples.jsonl")) > 0
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_ctrl_c_checkpoints_then_resume_finishes(tiny_dir, tmp_path, monkeypatch):
    """A Ctrl-C during step 1 finishes the step, writes checkpoint 1 and exits with 130;
    --run.resume then runs steps 2 and 3 (the baseline state comes back with it)."""
    import posttrain.train as train

    use_fake_task(monkeypatch)
    original = train.StopOnInterrupt

    class Interrupted(original):
        def __enter__(self):
            super().__enter__()
            self.requested = True  # as if Ctrl-C arrived during the first step
            return self

    monkeypatch.setattr(train, "StopOnInterrupt", Interrupted)
    args = _args(tiny_dir, tmp_path, "c", "--eval_limit=0")
    assert main(args) == 130
    run = tmp_path / "runs" / "c"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    monkeypatch.setattr(train, "StopOnInterrupt", original)
    assert main(args + ["--run.resume", str(run)]) == 0
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert recs[1]["baseline"] == pytest.approx(recs[0]["reward/mean"])  # moving average resumed
