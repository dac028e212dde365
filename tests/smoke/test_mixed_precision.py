"""accelerate's bf16 mixed precision (`mixed_precision: bf16`, as in configs/accelerate/ddp.yaml):
every forward of an online step runs under the same autocast as the prepared policy's, so the
reference policy (a frozen copy, made before `accelerate.prepare`, or PPO's reference that
bypasses the prepared actor-critic) computes what the policy computes: log pi - log ref is 0 at
step 0, as in fp32."""

from __future__ import annotations

import json

import pytest
from rl_fakes import REWARD_PY, use_fake_task

from posttrain.cli import main


@pytest.fixture()
def bf16_accelerator(monkeypatch):
    """A fresh accelerate state that reads mixed_precision=bf16 from the environment (as
    `accelerate launch` passes it); the state is a process-wide singleton, so reset it around."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize(
    "command, extra",
    [
        ("grpo", ["--kl_coef=0.1", "--samples_per_prompt=2", "--exact_kl=true"]),
        ("reinforce", ["--kl_coef=0.1", "--exact_kl=true"]),
        ("ppo", ["--kl_coef=0.1", "--num_minibatches=2"]),
    ],
)
def test_reference_runs_under_the_policys_mixed_precision(
    command, extra, bf16_accelerator, tiny_dir, tmp_path, monkeypatch
):
    use_fake_task(monkeypatch)
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    args = [command, "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
            "--run.name", "bf16", "--run.progress=false", "--steps=1", "--batch_size=2",
            "--eval_limit=0", f"--reward.components=python:{reward}:e_rate", *extra]  # fmt: skip
    assert main(args) == 0
    lines = (tmp_path / "runs" / "bf16" / "metrics.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    # the policy is the reference at step 0: the same weights through the same bf16 matmuls
    assert rec["kl/k1"] == 0.0 and rec["kl/exact"] == 0.0, rec
