"""Mistakes a user makes on the command line get one clear line on stderr and exit code 2."""

from __future__ import annotations

import pytest

from posttrain.cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


@pytest.mark.parametrize("command", ["eval", "sft", "generate"])
def test_wrong_adapter_path_is_one_line(command, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [command, "--model", str(tiny_dir), "--adapter", str(tmp_path / "nowhere")]
    argv += ["--prompt", "hi"] if command == "generate" else ["--run.progress=false"]
    assert main(argv) == 2
    line = _error(capsys)
    assert "adapter path" in line and "does not exist" in line


def test_a_run_folder_as_adapter_points_at_final(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "r" / "final").mkdir(parents=True)
    assert main(["generate", "--model", str(tiny_dir), "--adapter", "runs/r", "--prompt", "x"]) == 2
    assert "RUN/final/" in _error(capsys)


@pytest.mark.parametrize("name", ["runs/missing", "./missing"])
def test_missing_local_model_path_says_so(name, tmp_path, capsys, monkeypatch):
    """`runs/x` is a path when ./runs exists: no hub request, no "couldn't connect"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["generate", "--model", name, "--prompt", "hi"]) == 2
    line = _error(capsys)
    assert "does not exist" in line and "huggingface.co" not in line


def test_unknown_bare_name_is_not_a_connection_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", "--model", "no-such-model-here", "--prompt", "hi"]) == 2
    line = _error(capsys)
    assert "no such local file or directory" in line and "couldn't connect" not in line


@pytest.mark.parametrize("command", ["sft", "eval"])
def test_a_failed_start_leaves_a_folder_the_next_run_reuses(command, tiny_dir, tmp_path, capsys):
    """A run that fails before its first step does not push the next one to NAME-2."""
    common = ["--run.out_dir", str(tmp_path), "--run.name=x", "--run.progress=false"]
    bad = [command, "--model", str(tiny_dir), "--adapter", str(tmp_path / "nowhere"), *common]
    assert main(bad) == 2
    assert main(bad) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    good = [command, "--model", str(tiny_dir), *common]
    good += ["--train.max_steps=1", "--eval_limit=0"] if command == "sft" else ["--limit=1"]
    assert main(good + ["--max_new_tokens=2"] * (command == "eval")) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["x"]
    assert main(good + ["--max_new_tokens=2"] * (command == "eval")) == 0  # a real run stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x-2"]
