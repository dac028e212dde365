"""Online RL with `--tools.names calculator` through the CLI, on a tiny model that calls the
calculator (tests/smoke/tool_fakes.py): the calls run, their results are in the completions and in
samples.jsonl, losses are finite, and a run killed mid-way resumes exactly. Also issue #16: with
LoRA dropout the ratio of GRPO's first update is 1 (dropout off in every forward)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from rl_fakes import use_fake_task
from safetensors.torch import load_file
from tool_fakes import REWARD_PY, build_caller

from posttrain.cli import main
from posttrain.runs import read_jsonl

SMOKE = Path(__file__).resolve().parent
MAX_NEW = 16  # room for a call and its result, and part of a second one


@pytest.fixture(scope="module")
def caller_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_caller(tmp_path_factory.mktemp("caller"))


def _args(command: str, model: Path, tmp_path: Path, name: str, *extra: str) -> list[str]:
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    per_command = {
        "grpo": ["--samples_per_prompt=3", "--update_epochs=2", "--kl_coef=0.1", "--exact_kl=true"],
        "rloo": ["--samples_per_prompt=2"],
        "reinforce": ["--kl_coef=0.1", "--kl_in=loss", "--kl_estimator=k3"],
        "ppo": ["--num_minibatches=1", "--update_epochs=2", "--kl_coef=0.1",
                "--loss_reduction=fixed"],
    }  # fmt: skip
    return [
        command,
        "--model.name", str(model),
        "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name,
        "--run.progress=false",
        "--run.threads=1",
        "--run.sample_every=1",
        "--steps=2",
        "--batch_size=2",
        "--optim.lr=1e-3",
        "--eval_limit=2",
        f"--gen.max_new_tokens={MAX_NEW}",
        f"--reward.components=python:{reward}:stars",
        "--tools.names", "calculator",
        *per_command[command],
        *extra,
    ]  # fmt: skip


def _train_records(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss/total" in r]


@pytest.mark.parametrize("command", ["grpo", "rloo", "reinforce", "ppo"])
def test_online_run_with_the_calculator(command, caller_dir, tmp_path, monkeypatch):
    use_fake_task(monkeypatch, max_new_tokens=MAX_NEW)
    assert main(_args(command, caller_dir, tmp_path, command)) == 0
    run = tmp_path / "runs" / command
    recs = _train_records(run)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        assert r["tools/calls"] >= 1 and r["tools/errors"] == 0 and r["tools/tokens"] > 0
        # the sampled tokens and the tool's fill the completions, max_new_tokens at most
        assert r["completion_length"] + r["tools/tokens"] <= MAX_NEW
    if command in ("grpo", "rloo", "reinforce"):  # the KL starts at 0: no tool token in it
        assert abs(recs[0].get("kl/k3", 0.0)) < 1e-4
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(r["eval/tools/calls"] >= 1 for r in evals)
    samples = read_jsonl(run / "samples.jsonl")
    train = [s for s in samples if s.get("split") != "validation"]
    assert train and all("tool_calls" in s for s in samples)
    calls = [c for s in train for c in s["tool_calls"]]
    assert calls and all(c["tool"] == "calc" and not c["error"] for c in calls)
    for c in calls:  # the calculator's answer to the model's expression, in the completion
        assert c["result"] == str(math.prod(int(x) for x in c["call"].split("*")))
    first = next(s for s in train if s["tool_calls"])
    c = first["tool_calls"][0]
    assert f"<calc>{c['call']}</calc> = {c['result']}\n" in first["completion"]
    before = load_file(str(caller_dir / "model.safetensors"))
    after = load_file(str(run / "final" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_tool_alias_and_toml_section(tmp_path):
    from posttrain.algos.grpo import GRPOConfig
    from posttrain.algos.ppo import Config as PPOConfig
    from posttrain.algos.reinforce import Config as ReinforceConfig
    from posttrain.config import load_config

    toml = tmp_path / "c.toml"
    toml.write_text('[tools]\nnames = ["calculator"]\nmax_calls = 2\n')
    for cls in (GRPOConfig, PPOConfig, ReinforceConfig):
        assert load_config(cls, None, ["--tool", "calculator"]).tools.names == ["calculator"]
        assert load_config(cls, None, ["--tools.names=calculator"]).tools.names == ["calculator"]
        cfg = load_config(cls, toml, [])
        assert (cfg.tools.names, cfg.tools.max_calls) == (["calculator"], 2)
        assert load_config(cls, None, []).tools.names == []


def test_grpo_first_ratio_is_one_with_lora_dropout(tiny_dir, tmp_path, monkeypatch):
    """Issue #16: an adapter with dropout 0.5 (and B != 0, where dropout shows) and lr 0, so the
    policy never changes: with dropout off in the scoring pass and the training forwards, every
    ratio is 1 and nothing is clipped. Before the fix the policy was in train mode for both."""
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora, load_model

    model, _ = load_model(str(tiny_dir))
    model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.5))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    use_fake_task(monkeypatch)
    args = _args("grpo", tiny_dir, tmp_path, "dropout", "--lora.enabled=true",
                 f"--model.adapter={tmp_path / 'adapter'}", "--optim.lr=1e-30", "--eval_limit=0")  # fmt: skip
    assert main(args) == 0
    for r in _train_records(tmp_path / "runs" / "dropout"):
        assert r["ratio"] == pytest.approx(1.0, abs=1e-6) and r["clip_fraction"] == 0


# ---------------------------------------------------------------------------------------------
# Killed and resumed (the pattern of tests/smoke/test_resume.py, with the fake task)

LAUNCH = (
    "import sys; sys.path.insert(0, {smoke!r}); import posttrain.tasks; "
    "from rl_fakes import FakeTask; "
    "posttrain.tasks.load_task = lambda cfg: FakeTask(cfg, max_new_tokens={n}); "
    "from posttrain.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _run_and_kill(args: list[str], cwd: Path, after: int = 3, timeout: float = 240) -> None:
    """The command in a subprocess, SIGKILLed right after it prints step `after`'s line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    code = LAUNCH.format(smoke=str(SMOKE), n=MAX_NEW)
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    out = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            if line.startswith(f"[step {after}]"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL, "not killed mid-way:\n" + "".join(out)[-4000:]


def _timeless(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def test_grpo_with_tools_killed_and_resumed_equals_uninterrupted(caller_dir, tmp_path, monkeypatch):
    steps = ["--steps=6", "--run.save_every=2", "--run.sample_every=2", "--eval_limit=0"]
    killed = tmp_path / "runs" / "killed"
    _run_and_kill(_args("grpo", caller_dir, tmp_path, "killed", *steps), tmp_path)
    assert sorted(p.name for p in (killed / "checkpoints").glob("step_*"))[0] == "step_000002"
    assert not (killed / "final").exists()
    use_fake_task(monkeypatch, max_new_tokens=MAX_NEW)
    args = _args("grpo", caller_dir, tmp_path, "killed", *steps)
    assert main([*args, "--run.resume", str(killed)]) == 0
    whole = tmp_path / "runs" / "whole"
    assert main(_args("grpo", caller_dir, tmp_path, "whole", *steps)) == 0
    a, b = read_jsonl(whole / "metrics.jsonl"), read_jsonl(killed / "metrics.jsonl")
    assert [r["step"] for r in b] == [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert all(r["tools/calls"] >= 1 for r in a)
    assert _timeless(a) == _timeless(b)
    assert read_jsonl(whole / "samples.jsonl") == read_jsonl(killed / "samples.jsonl")
    wa = load_file(str(whole / "final" / "model.safetensors"))
    wb = load_file(str(killed / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
