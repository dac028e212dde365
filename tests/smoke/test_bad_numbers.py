"""Bad numbers and a bad --run.resume end in one line on stderr and exit code 2, for every command
that takes them, from the command line and from Python (#16 item 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grpo", "--optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
        (["sft", "--train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["grpo", "--samples_per_prompt=1"], "samples_per_prompt must be >= 2, got 1"),
        (["rloo", "--samples_per_prompt=1"], "samples_per_prompt must be >= 2, got 1"),
        (["reinforce", "--batch_size=0"], "batch_size must be >= 1, got 0"),
        (["ppo", "--lam=1.5"], "lam must be in [0, 1], got 1.5"),
        (["ppo", "--kl_horizon=0"], "kl_horizon must be >= 1, got 0"),
        (["dpo", "--beta=0"], "beta must be > 0, got 0.0"),
        (["distill", "--weight=2"], "weight must be in [0, 1], got 2.0"),
        (["rft", "--k=0"], "k must be >= 1, got 0"),
        (["reward-model", "--optim.grad_accum=0"], "optim.grad_accum must be >= 1, got 0"),
        (["eval", "--limit=-1"], "limit must be >= 0, got -1"),
        (["generate", "--prompt=x", "--gen.top_p=0"], "gen.top_p must be in (0, 1], got 0.0"),
        (["sft", "--lora.dropout=1"], "lora.dropout must be in [0, 1), got 1.0"),
    ],
)
def test_bad_number_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert _one_line(capsys) == f"posttrain {argv[0]}: error: {message}"


@pytest.mark.parametrize("command", ["sft", "grpo", "dpo"])
def test_resume_from_a_folder_that_is_not_a_run(command, tmp_path, capsys):
    assert main([command, f"--run.resume={tmp_path}"]) == 2
    assert "run.resume must be a run directory" in _one_line(capsys)


def test_resume_from_a_run_without_a_checkpoint(tiny_dir, tmp_path, capsys):
    (tmp_path / "config.toml").write_text("")
    argv = ["sft", "--model", str(tiny_dir), f"--run.resume={tmp_path}", "--run.progress=false"]
    assert main(argv) == 2
    assert "has no checkpoint to resume from" in _one_line(capsys)


def test_python_main_checks_the_same_rules(tmp_path):
    """grpo.main(cfg) from Python: the same one-line error before any model is loaded."""
    from posttrain.algos import grpo

    cfg = grpo.GRPOConfig()
    cfg.samples_per_prompt = 1
    cfg.run.out_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="^samples_per_prompt must be >= 2, got 1$"):
        grpo.main(cfg)


def test_the_installed_command_prints_no_traceback(tmp_path):
    """The real `posttrain` process: stderr is the one line, exit code 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", "--optim.lr=-1", f"--run.resume={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "optim.lr must be > 0" in lines[0] and "run.resume must be a run directory" in lines[0]
