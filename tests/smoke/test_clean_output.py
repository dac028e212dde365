"""Nothing from the libraries' internals reaches a user's terminal (#17): a few commands run as a
user runs them (a fresh process, the tiny model, progress bars off) and their stderr must hold
no line beyond the expected ones. A new library warning, an ANSI load report or a dataset bar
fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GOOD = [" wonderful", " great fun", " a good story"]
BAD = [" terrible", " boring", " a bad ending"]
# stderr lines a user may see (none today); a regular expression per line would go here
EXPECTED: list[str] = []


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"The movie {i} was", "chosen": GOOD[i % 3], "rejected": BAD[i % 3]}
            for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def commands(tiny: str, pairs: str) -> dict[str, list[str]]:
    return {
        "sft": ["sft", "--model", tiny, "--train.max_steps=1", "--eval_limit=1",
                "--eval_max_new_tokens=2"],
        "reward-model": ["reward-model", "--model.name", tiny, "--data.source", pairs,
                         "--max_steps=1", "--batch_size=2"],
        "dpo": ["dpo", "--model.name", tiny, "--data.source", pairs, "--max_steps=1",
                "--batch_size=2"],
        "reinforce": ["reinforce", "--model.name", tiny, "--steps=1", "--batch_size=2",
                      "--eval_limit=2", "--gen.max_new_tokens=4"],
        "eval": ["eval", "--model", tiny, "--task", "unit_conversion", "--limit=1",
                 "--max_new_tokens=2"],
    }  # fmt: skip


@pytest.mark.parametrize("name", ["sft", "reward-model", "dpo", "reinforce", "eval"])
def test_stderr_holds_no_library_noise(name, tiny_dir, pairs, tmp_path):
    argv = commands(str(tiny_dir), str(pairs))[name]
    argv += ["--run.progress=false", "--run.out_dir", str(tmp_path / "runs"), "--run.threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain", *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    unexpected = [ln for ln in proc.stderr.splitlines() if ln.strip() and ln not in EXPECTED]
    assert not unexpected, f"{name} printed to stderr:\n" + "\n".join(unexpected[:20])
    assert "\x1b[" not in proc.stdout  # no ANSI codes from a library on stdout either
