"""A run killed with SIGKILL and resumed equals a run that was never interrupted.

For each training command: `python -m posttrain <cmd> ... --run.save_every=2` runs in a
subprocess and is killed (SIGKILL: no handler, no flush, no atexit) as soon as it has printed
step 3's metrics line (of 6), so its last checkpoint is step 2 (4 if the kill came late) and
metrics.jsonl / samples.jsonl already hold records past it. `--run.resume RUN_DIR` then finishes
the run. Against an uninterrupted run with the same config: every metric but the wall-clock times,
every sample and every final weight must be identical, and metrics.jsonl must hold each step once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import COMMANDS, main
from posttrain.plots import group_of
from posttrain.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6  # room after the kill point: the kill lands before the run ends, even on a busy machine
KILL_AFTER = 3  # the step whose metrics line triggers the kill
TIMEOUT = 240

SFT_ROWS = [
    {"prompt": "How many grams are there per 6 kg? ", "completion": "<answer>6000</answer>"},
    {"prompt": "Convert 3 feet to inches. ", "completion": "<answer>36</answer>"},
    {"prompt": "How many grams are there per 2 kg? ", "completion": "<answer>2000</answer>"},
    {"prompt": "Convert 1 feet to inches. ", "completion": "<answer>12</answer>"},
    {"prompt": "This film is", "completion": " a wonderful story with good actors"},
]
DPO_ROWS = [
    {"prompt": f"The movie {i} was", "chosen": good, "rejected": bad}
    for i, (good, bad) in enumerate(
        [(" great fun", " terrible"), (" a wonderful story", " boring and bad"),
         (" good actors", " a bad ending"), (" fun and great", " terrible boring"),
         (" great", " bad")]
    )
]  # fmt: skip
REWARD = "def chars(prompts, completions, batch):\n    return [len(c) / 10 for c in completions]\n"


def _args(command: str, tiny_dir: Path, tmp_path: Path, name: str) -> list[str]:
    common = [
        "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name, "--run.progress=false", "--run.threads=1", "--run.save_every=2",
        "--run.sample_every=2", "--optim.lr=1e-3",
    ]  # fmt: skip
    if command == "sft":  # LoRA with dropout: the resumed RNG must replay the same masks
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
        return ["sft", *common, "--data.source", str(data), "--data.validation_size=0",
                "--lora.enabled=true", "--lora.r=4", "--lora.dropout=0.1",
                "--train.batch_size=2", f"--train.max_steps={STEPS}"]  # fmt: skip
    if command == "dpo":  # 5 pairs, batch 2: the resumed steps cross an epoch boundary
        data = tmp_path / "dpo.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in DPO_ROWS))
        return ["dpo", *common, "--data.source", str(data), "--data.eval_fraction=0",
                "--batch_size=2", f"--max_steps={STEPS}"]  # fmt: skip
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD)
    online = [
        "--task.name", "unit_conversion", "--task.train_size", "6",
        "--reward.components", f"python:{reward}:chars", "--gen.max_new_tokens", "6",
        "--batch_size", "2", "--steps", str(STEPS),
    ]  # fmt: skip
    if command == "reinforce":  # moving-average baseline and a KL penalty: state to restore
        return ["reinforce", *common, *online, "--eval_limit=0", "--kl_coef=0.1"]
    # ppo: value head, adaptive KL controller, two epochs of shuffled mini-batches
    return ["ppo", *common, *online, "--task.strategy", "direct", "--num_minibatches", "2",
            "--update_epochs", "2", "--kl_coef", "0.1"]  # fmt: skip


def run_and_kill(args: list[str], cwd: Path) -> str:
    """`python -m posttrain ARGS`, SIGKILLed right after it prints step KILL_AFTER's line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "posttrain", *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    out = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.startswith(f"[step {KILL_AFTER}]"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
    text = "".join(out)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-way:\n{text[-4000:]}"
    return text


def timeless(records: list[dict]) -> list[dict]:
    """Records without wall-clock quantities (seconds, time/*, throughput)."""
    return [
        {k: v for k, v in r.items() if group_of(k) != "time" and "per_s" not in k} for r in records
    ]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    files = sorted((run / "final").rglob("*.safetensors"))
    assert files, f"no weights under {run / 'final'}"
    return {
        f"{f.relative_to(run).as_posix()}:{k}": v for f in files for k, v in load_file(f).items()
    }


def first_difference(a: list[dict], b: list[dict]) -> str:
    for ra, rb in zip(a, b):
        if ra != rb:
            keys = sorted(k for k in ra.keys() | rb.keys() if ra.get(k) != rb.get(k))
            diffs = ", ".join(f"{k}: {ra.get(k)!r} vs {rb.get(k)!r}" for k in keys[:6])
            return f"step {ra.get('step')}: {diffs}"
    return f"{len(a)} records vs {len(b)}"


@pytest.mark.parametrize("command", ["sft", "dpo", "reinforce", "ppo"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(command, tiny_dir, tmp_path):
    if not (ROOT / "src" / Path(*COMMANDS[command][0].split("."))).with_suffix(".py").is_file():
        pytest.skip(f"{command} is not implemented yet")
    # killed after step 3: a checkpoint exists, no final weights, records past the checkpoint
    killed = tmp_path / "runs" / "killed"
    run_and_kill(_args(command, tiny_dir, tmp_path, "killed"), tmp_path)
    ckpts = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert ckpts in (["step_000002"], ["step_000002", "step_000004"]), ckpts
    assert not (killed / "final").exists()
    assert max(r["step"] for r in read_jsonl(killed / "metrics.jsonl")) >= KILL_AFTER

    args = _args(command, tiny_dir, tmp_path, "killed")
    assert main([*args, "--run.resume", str(killed)]) == 0
    whole = tmp_path / "runs" / "whole"
    assert main(_args(command, tiny_dir, tmp_path, "whole")) == 0

    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    steps_a, steps_b = [r["step"] for r in a], [r["step"] for r in b]
    assert steps_b == steps_a, f"{command}: metrics.jsonl steps {steps_b}, uninterrupted {steps_a}"
    assert max(steps_a) == STEPS
    problems = []
    if timeless(a) != timeless(b):
        problems.append("metrics differ at " + first_difference(timeless(a), timeless(b)))
    sa, sb = read_jsonl(whole / "samples.jsonl"), read_jsonl(killed / "samples.jsonl")
    if timeless(sa) != timeless(sb):
        problems.append("samples differ at " + first_difference(timeless(sa), timeless(sb)))
    wa, wb = final_weights(whole), final_weights(killed.parent / "killed")
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    if differ:
        worst = max(float((wa[k] - wb[k]).abs().max()) for k in differ)
        problems.append(f"{len(differ)} of {len(wa)} final tensors differ (max {worst:.3g})")
    assert not problems, f"{command}: resumed != uninterrupted: {problems}"
