"""The GPU tier (#16 item 9), on the tiny random Llama of tests/conftest.py: CUDA generation equals
CPU generation (greedy), bf16 autocast runs forward and backward, every training command runs 2
steps on the GPU through the CLI, and accelerate's bf16 config (configs/accelerate/ddp.yaml's
mixed precision) trains with a reference whose log-probs match the policy's at step 0."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "smoke"))  # rl_fakes
from rl_fakes import REWARD_PY, use_fake_task  # noqa: E402

from posttrain.cli import main
from posttrain.runs import read_jsonl

# Every test here is marked gpu and skipped, with one reason, without CUDA;
# POSTTRAIN_GPU_TIER_ON_CPU=1 runs those that do not need CUDA itself on the CPU, to check the
# tier's own arguments. (No conftest.py here: a second one would shadow tests/conftest.py for
# `from conftest import ...` in the whole suite.)
ON_CPU = os.environ.get("POSTTRAIN_GPU_TIER_ON_CPU") == "1"
NO_CUDA = "gpu tier: no CUDA device here (torch.cuda.is_available() is False)"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason=NO_CUDA),
]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)

PAIRS = [
    {"prompt": "How many grams are there per 6 kg? ", "chosen": "6000", "rejected": "60"},
    {"prompt": "Convert 3 feet to inches. ", "chosen": "36", "rejected": "3"},
    {"prompt": "The movie was ", "chosen": "great fun", "rejected": "dull"},
    {"prompt": "hello world ", "chosen": "Paris.", "rejected": "Rome."},
]


@cuda_only
def test_cuda_generation_equals_cpu_generation(tiny_dir):
    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    prompts = ["How many grams", "Convert 3 feet to inches. It is a long prompt"]
    cfg = GenerationConfig(temperature=0, max_new_tokens=12)
    on_cpu, tok = load_model(str(tiny_dir), device="cpu", dtype="float32")
    on_gpu, _ = load_model(str(tiny_dir), device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = False
    a = generate(on_cpu, tok, prompts, cfg)
    b = generate(on_gpu, tok, prompts, cfg)
    assert torch.equal(a.completion_ids.cpu(), b.completion_ids.cpu())
    torch.testing.assert_close(a.logp.cpu(), b.logp.cpu(), rtol=1e-3, atol=1e-3)


@cuda_only
def test_bf16_autocast_forward_and_backward(tiny_dir):
    from posttrain.models import load_model

    model, tok = load_model(str(tiny_dir), device="cuda", dtype="float32")
    model.train()
    ids = tok(["The movie was great fun"], return_tensors="pt").input_ids.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and math.isfinite(out.loss.item())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _common(tiny_dir, tmp_path, name):
    return [
        "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name, "--run.progress=false", "--optim.lr=1e-3",
    ]  # fmt: skip


def _argv(command, tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in PAIRS))
    sft_rows = tmp_path / "sft.jsonl"
    sft_rows.write_text(
        "\n".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) for r in PAIRS)
    )
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    online = ["--steps=2", "--batch_size=2", "--eval_limit=0",
              f"--reward.components=python:{reward}:e_rate"]  # fmt: skip
    sft_like = [f"--data.source={sft_rows}", "--data.validation_size=0",
                "--train.batch_size=2", "--train.max_steps=2", "--eval_limit=0"]  # fmt: skip
    return {
        "sft": sft_like,
        "distill": [*sft_like, f"--teacher.name={tiny_dir}"],
        "dpo": [f"--data.source={pairs}", "--data.eval_fraction=0", "--batch_size=2",
                "--max_steps=2"],
        "reward-model": [f"--data.source={pairs}", "--data.eval_fraction=0", "--batch_size=2",
                         "--max_steps=2"],
        "reinforce": [*online, "--kl_coef=0.1"],
        "rloo": [*online, "--samples_per_prompt=2"],
        "grpo": [*online, "--samples_per_prompt=2"],
        "ppo": [*online, "--num_minibatches=1", "--update_epochs=1"],
    }[command]  # fmt: skip


COMMANDS = ["sft", "distill", "dpo", "reward-model", "reinforce", "rloo", "grpo", "ppo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_two_steps(command, tiny_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch)
    argv = [command, *_common(tiny_dir, tmp_path, command), *_argv(command, tiny_dir, tmp_path)]
    assert main(argv) == 0
    recs = [r for r in read_jsonl(tmp_path / "runs" / command / "metrics.jsonl") if "step" in r]
    assert recs, "no metrics logged"
    for r in recs:
        for k, v in r.items():
            if isinstance(v, float):
                assert math.isfinite(v), (k, r)


def test_accelerate_bf16_mixed_precision(tiny_dir, tmp_path, monkeypatch):
    """configs/accelerate/ddp.yaml's mixed_precision=bf16 on one process: GRPO trains, and the
    reference agrees with the policy at the start (ratio 1, KL ~0 in the first step)."""
    if not torch.cuda.is_available():
        pytest.skip("accelerate's bf16 mixed precision applies on CUDA only")
    use_fake_task(monkeypatch)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    argv = ["grpo", *_common(tiny_dir, tmp_path, "bf16"), *_argv("grpo", tiny_dir, tmp_path),
            "--kl_coef=0.1", "--optim.lr=1e-9"]  # fmt: skip
    assert main(argv) == 0
    first = next(
        r for r in read_jsonl(tmp_path / "runs" / "bf16" / "metrics.jsonl") if "ratio" in r
    )
    assert first["ratio"] == pytest.approx(1.0, abs=1e-2)
    assert abs(first["kl/k3"]) < 1e-2
