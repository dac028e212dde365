"""`posttrain ppo` through the CLI on the tiny model with a Python reward file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main

REWARD = """
def reward(prompts, completions, batch):
    # longer completions with more spaces score higher: something the tiny model can move
    return [min(len(c), 40) / 40 + c.count(" ") / 10 for c in completions]
"""


def _args(tiny_dir: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(REWARD)
    return [
        "ppo",
        "--model.name", str(tiny_dir),
        "--task.name", "unit_conversion",
        "--task.strategy", "direct",
        "--task.train_size", "16",
        "--reward.components", f"python:{reward_file}:reward",
        "--gen.max_new_tokens", "8",
        "--batch_size", "4",
        "--num_minibatches", "2",
        "--update_epochs", "2",
        "--optim.lr", "1e-3",
        "--kl_coef", "0.1",
        "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name,
        "--run.progress", "false",
        "--run.sample_every", "1",
        "--eval_limit", "0",
        *extra,
    ]  # fmt: skip


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ppo_full_finetune_changes_policy_and_value_head(tiny_dir, tmp_path):
    assert main(_args(tiny_dir, tmp_path, "full", "--steps", "3")) == 0
    run = tmp_path / "runs" / "full"
    recs = _records(run)
    assert [r["step"] for r in recs] == [1, 2, 3]
    for key in ("loss/policy", "loss/value", "loss/total", "kl/k1", "kl/exact", "entropy"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert recs[0]["ratio"] == pytest.approx(1.0, abs=0.05)  # first mini-batch is on-policy
    assert recs[0]["kl/k1"] == pytest.approx(0.0, abs=1e-4)  # the policy starts at the reference
    assert recs[-1]["kl/exact"] > 0
    before = load_file(str(tiny_dir / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no policy weight changed"
    head = load_file(str(run / "final" / "value_head.safetensors"))
    assert head["summary.weight"].abs().sum() > 0  # starts at zero
    # the folder remembers how it was trained, as reinforce/rloo/grpo's do (posttrain eval reads it)
    trained = json.loads((run / "final" / "posttrain.json").read_text())
    assert trained["command"] == "ppo" and trained["task"]["name"] == "unit_conversion"
    samples = (run / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 4 and "completion" in json.loads(samples[0])
    # a new run can start from the trained value head instead of a zero one
    warm = ["--steps", "1", "--value_head", str(run / "final")]
    assert main(_args(tiny_dir, tmp_path, "warm", *warm)) == 0
    assert _records(tmp_path / "runs" / "warm")[0]["value/mean"] != 0.0
    assert recs[0]["value/mean"] == 0.0


def test_ppo_lora_trains_adapter_and_value_head(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path, "lora", "--steps", "2", "--lora.enabled", "--lora.r", "4")
    assert main(args) == 0
    final = tmp_path / "runs" / "lora" / "final"
    adapter = load_file(str(final / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero
    assert load_file(str(final / "value_head.safetensors"))["summary.weight"].abs().sum() > 0
    recs = _records(tmp_path / "runs" / "lora")
    assert all(math.isfinite(r["loss/total"]) for r in recs)


def test_ppo_resume_matches_an_uninterrupted_run(tiny_dir, tmp_path):
    """2 steps, then --run.resume to 4 steps == 4 steps in one go (weights, value head, beta,
    the reward normaliser's running statistics, the prompt order)."""
    more = ["--run.save_every", "2", "--reward.normalize"]
    assert main(_args(tiny_dir, tmp_path, "whole", "--steps", "4", *more)) == 0
    assert main(_args(tiny_dir, tmp_path, "split", "--steps", "2", *more)) == 0
    split = tmp_path / "runs" / "split"
    assert (
        main(_args(tiny_dir, tmp_path, "x", "--steps", "4", *more, "--run.resume", str(split))) == 0
    )
    whole = tmp_path / "runs" / "whole"
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(whole / "final" / name)), load_file(str(split / "final" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ra, rb = _records(whole), _records(split)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for key in ("reward/mean", "loss/total", "kl_coef", "kl/k1", "reward/running_std"):
        assert ra[-1][key] == pytest.approx(rb[-1][key], rel=1e-6), key


def test_ppo_separate_critic_and_eval(tiny_dir, tmp_path):
    args = _args(tiny_dir, tmp_path, "critic", "--steps", "2", "--critic", "separate",
                 "--eval_limit", "4", "--kl_controller", "fixed")  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "runs" / "critic"
    recs = _records(run)
    evals = [r for r in recs if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2]  # at the start and the end
    assert [r["kl_coef"] for r in recs if "loss/total" in r] == [0.1, 0.1]
    before = load_file(str(tiny_dir / "model.safetensors"))
    critic = load_file(str(run / "final" / "critic" / "model.safetensors"))
    assert any(not torch.equal(before[k], critic[k]) for k in before)  # the critic trained
    assert (run / "checkpoints" / "step_000002" / "critic" / "model.safetensors").is_file()


def test_ppo_grad_accum_matches_one_big_mini_batch(tiny_dir, tmp_path):
    """With the seq_mean reduction, mini-batch 4 as 4 micro-batches of 1 gives the update of
    one micro-batch of 4 (same data, same sampled rollout). AdamW's eps = 1 makes its first
    update about lr * grad, so that weights compare gradients (with a small eps the first update
    is lr * sign(grad), which flips on rounding noise for near-zero gradients).
    It also pins ppo's one-forward path ("one": 1 epoch x 1 mini-batch x 1 micro-batch, the values
    and logits of the training forward, old_logp = logp.detach(), the sampler's logp in the KL)
    to the explicit path ("acc": a no-grad scoring forward first)."""
    common = ["--steps", "1", "--num_minibatches", "1", "--update_epochs", "1", "--optim.eps", "1",
              "--loss_reduction", "seq_mean", "--run.sample_every", "0"]  # fmt: skip
    assert main(_args(tiny_dir, tmp_path, "one", *common)) == 0
    assert main(_args(tiny_dir, tmp_path, "acc", *common, "--optim.grad_accum", "4")) == 0
    a = load_file(str(tmp_path / "runs" / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "runs" / "acc" / "final" / "model.safetensors"))
    before = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in a)
    for k in a:
        step_a, step_b = a[k] - before[k], b[k] - before[k]
        assert (step_a - step_b).abs().max() <= 1e-3 * step_a.abs().max() + 1e-12, k
    ra, rb = _records(tmp_path / "runs" / "one")[0], _records(tmp_path / "runs" / "acc")[0]
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)


def test_ppo_ctrl_c_checkpoints_and_resumes(tiny_dir, tmp_path):
    """A SIGINT during step 2 (sent by the reward) finishes the step, checkpoints, exits 130."""
    stopper = tmp_path / "stop_reward.py"
    marker = tmp_path / "interrupted"
    stopper.write_text(
        "import os, pathlib, signal\ncalls = 0\n"
        "def reward(prompts, completions, batch):\n"
        "    global calls\n    calls += 1\n"
        f"    marker = pathlib.Path({str(marker)!r})\n"
        "    if calls == 2 and not marker.exists():  # once, not again after the resume\n"
        "        marker.touch()\n        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return [len(c) / 10 for c in completions]\n"
    )
    args = _args(tiny_dir, tmp_path, "stop", "--steps", "4")
    args[args.index("--reward.components") + 1] = f"python:{stopper}:reward"
    assert main(args) == 130
    run = tmp_path / "runs" / "stop"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]
    assert not (run / "final").exists()
    assert main([*args, "--run.resume", str(run)]) == 0
    assert [r["step"] for r in _records(run)] == [1, 2, 3, 4]
    assert (run / "final" / "value_head.safetensors").is_file()


def test_ppo_one_forward_path_with_shared_prompts(tiny_dir, tmp_path):
    """1 epoch x 1 mini-batch x 1 micro-batch (the training forward gives the values) with 2
    samples per prompt (the reference runs each prompt once): ratio 1 exactly, finite metrics."""
    extra = ["--steps", "2", "--batch_size", "2", "--samples_per_prompt", "2",
             "--num_minibatches", "1", "--update_epochs", "1"]  # fmt: skip
    assert main(_args(tiny_dir, tmp_path, "one", *extra)) == 0
    recs = _records(tmp_path / "runs" / "one")
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("loss/policy", "loss/value", "kl/k1", "entropy", "value/mean"):
        assert all(math.isfinite(r[key]) for r in recs), key
    assert all(r["ratio"] == 1.0 and "kl/exact" not in r for r in recs)
    assert recs[0]["kl/k1"] == pytest.approx(0.0, abs=1e-4)
