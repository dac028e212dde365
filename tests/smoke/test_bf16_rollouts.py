"""`--gen.sample_dtype=bfloat16`: a bf16 copy of the policy samples, the fp32 policy trains, the
samples are rescored and their advantages importance-weighted (`online.score_rollout`)."""

from __future__ import annotations

import math

import pytest
import torch
from rl_fakes import REWARD_PY, use_fake_task
from safetensors.torch import load_file

import posttrain.online as online
from posttrain.cli import main
from posttrain.runs import read_jsonl


@pytest.mark.parametrize("command", ["grpo", "rloo", "reinforce", "ppo"])
def test_bf16_rollouts_train_end_to_end(command, tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    weights = []
    orig = online.score_rollout

    def spy(*a, **k):  # every rollout was a bf16 copy's and got its weights
        s = orig(*a, **k)
        weights.append(s.sampler_weight)
        return s

    monkeypatch.setattr(online, "score_rollout", spy)
    monkeypatch.setattr(
        f"posttrain.algos.{'grpo' if command == 'rloo' else command}.score_rollout", spy
    )
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    args = [command, "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
            "--run.name", "bf16", "--run.progress=false", "--steps=2", "--batch_size=2",
            "--samples_per_prompt=2", "--optim.lr=1e-2", "--eval_limit=0", "--kl_coef=0.1",
            "--gen.sample_dtype=bfloat16", "--gen.sampler_weight_cap=1.5",
            f"--reward.components=python:{reward}:e_rate"]  # fmt: skip
    assert main(args) == 0
    assert len(weights) == 2
    for w in weights:
        assert w is not None and bool((w <= 1.5).all()) and bool((w > 0).any())
    run = tmp_path / "runs" / "bf16"
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]
    assert len(recs) == 2 and all(math.isfinite(r["loss/total"]) for r in recs)
    after = load_file(str(run / "final" / "model.safetensors"))
    before = load_file(str(tiny_dir / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values())  # fp32 master weights
    assert any(not torch.equal(before[k], after[k]) for k in before)
