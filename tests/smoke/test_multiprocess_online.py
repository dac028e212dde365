"""reinforce and ppo on 2 processes (gloo, CPU) train like 1 process with the whole batch.

The machinery is test_multiprocess.py's (one `accelerate launch` for both commands, rank 1 dumps
its weights, the same strict comparison); this file holds the two online commands whose batch
statistics must be global to pass it: reinforce's batch-mean baseline (the mean over every
process's samples) and ppo's whitened advantages (mean and variance over every process's tokens),
with the KL to a frozen copy in the reward.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import (
    REWARD_PY,
    check_in_sync,
    checkpoint,
    differing,
    launch,
    train_record,
    weights,
)

from posttrain.cli import main

COMMANDS = ["reinforce", "ppo"]


def _args(command: str, tiny_dir: Path, tmp_path: Path, name: str, batch: int) -> list[str]:
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    args = [command, "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
            "--run.name", name, "--run.progress=false", "--run.threads=1", "--optim.lr=1e-2",
            "--optim.eps=1e-6", "--task.name", "unit_conversion", "--task.train_size", "8",
            "--gen.max_new_tokens", "6", f"--batch_size={batch}", "--samples_per_prompt=2",
            "--steps=1", "--eval_limit=0", f"--reward.components=python:{reward}:chars"]  # fmt: skip
    if command == "reinforce":  # the baseline of step 1 is the batch mean in both settings
        return [*args, "--baseline=mean", "--kl_coef=0.1"]
    # one optimizer step over the whole rollout
    return [*args, "--num_minibatches=1", "--update_epochs=1", "--kl_coef=0.1"]


@pytest.fixture(scope="module")
def two_procs(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two-procs-online")
    commands = {c: _args(c, tiny_dir, tmp, f"{c}-two", batch=2) for c in COMMANDS}
    out = launch(commands, tmp)
    status = {}
    for rank in (0, 1):
        f = tmp / f"status_{rank}.json"
        status[rank] = json.loads(f.read_text()) if f.is_file() else {}
    for c in COMMANDS:
        for rank in (0, 1):
            assert status[rank].get(c) == 0, (
                f"{c} on rank {rank}: {status[rank].get(c)}\n{out[-4000:]}"
            )
    return tmp


@pytest.mark.parametrize("command", COMMANDS)
def test_two_processes_equal_one_with_the_whole_batch(command, two_procs, tiny_dir, tmp_path):
    two = two_procs / "runs" / f"{command}-two"
    assert main(_args(command, tiny_dir, tmp_path, "one", batch=4)) == 0
    one = tmp_path / "runs" / "one"
    w2 = check_in_sync(two)
    w1 = {k: v for k, v in weights(checkpoint(one)).items() if k in w2}
    start = load_file(str(tiny_dir / "model.safetensors"))
    moved = [k for k, v in w1.items() if not torch.equal(v, start.get(k.split(":")[1], v))]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    r1, r2 = train_record(one), train_record(two)
    problems = [
        f"{key}: 1 x 4 logged {r1[key]:.6g}, 2 x 2 logged {r2[key]:.6g}"
        for key in ("loss/total", "grad_norm")
        if r2[key] != pytest.approx(r1[key], rel=1e-4, abs=1e-6)
    ]
    diff = differing(w1, w2)
    if diff:
        problems.append(
            f"{len(diff)} of {len(w1)} tensors differ (max abs diff {max(diff.values()):.3g})"
        )
    assert not problems, f"{command}: 2 processes x batch 2 != 1 process x batch 4: {problems}"
