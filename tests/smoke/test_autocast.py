"""`--run.autocast=bfloat16`: a command runs under torch.autocast (bf16 matmuls) with fp32 weights."""

from __future__ import annotations

import math

import pytest
import torch
from rl_fakes import REWARD_PY, use_fake_task
from safetensors.torch import load_file

import posttrain.algos.grpo as grpo
from posttrain.cli import main
from posttrain.runs import read_jsonl
from posttrain.train import autocast


def test_autocast_context():
    assert not torch.is_autocast_enabled("cpu")
    with autocast("bfloat16"):
        assert torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("no"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_grpo_under_bf16_autocast(tiny_dir, tmp_path, monkeypatch):
    """Generation, the shared-prompt reference and training forwards and the backward all run
    under autocast: finite losses, fp32 weights that changed."""
    use_fake_task(monkeypatch)
    seen = []
    orig = grpo.clipped_policy_loss

    def spy(logp, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return orig(logp, *a, **k)

    monkeypatch.setattr(grpo, "clipped_policy_loss", spy)
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    args = ["grpo", "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
            "--run.name", "bf16", "--run.progress=false", "--run.autocast=bfloat16", "--steps=2",
            "--batch_size=2", "--samples_per_prompt=3", "--optim.lr=1e-2", "--eval_limit=0",
            "--kl_coef=0.1", f"--reward.components=python:{reward}:e_rate"]  # fmt: skip
    assert main(args) == 0
    assert seen == [True, True]
    run = tmp_path / "runs" / "bf16"
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]
    assert len(recs) == 2
    for r in recs:
        for k in ("loss/total", "kl/k3", "entropy", "grad_norm"):
            assert math.isfinite(r[k]), (k, r)
        assert r["ratio"] == pytest.approx(1.0)
    after = load_file(str(run / "final" / "model.safetensors"))
    before = load_file(str(tiny_dir / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
