"""Docs as tests (#17): every fenced command and Python snippet in README.md and docs/ runs.

Each `bash` fence line is one command; each `python` fence is one snippet. They run as written,
with four mechanical changes, all defined below:

1. `default` is the tiny random model: POSTTRAIN_CACHE points at a cache whose converted
   "embedded default" is tests/conftest.py's tiny Llama, so `--model default`, the shipped
   configs' `name = "default"`, `load_model("default")` and `accelerate launch` subprocesses all
   load it, offline. HUB_MODELS swaps hub names for local stand-ins of the same kind (a teacher
   with the policy's tokenizer, a two-label classifier): the command's shape is what is tested.
2. TINY: small sizes, appended to each command for the keys its config has (a config command's
   last value wins), so each command family (online RL, sft-like, dpo-like, eval, generate)
   gets its own step, batch and generation limits from one table.
3. RUNS: run folders that the docs name (`runs/<run-dir>`, `runs/sft-unit-conversion`, ...) are
   the folders of the documented commands that make them; those run first (once: a command that
   appears twice runs once). SUBSTITUTIONS: paths outside the test's folder and GPU configs.
4. Python fragments that use names from their surrounding prose (`model`, `task`, `batch`, ...)
   get them from CONTEXT.

EXCLUDED is the one list of what does not run, with the reason for each. The data files the docs
assume (pairs.jsonl, chats.jsonl, my_rewards.py) are written into the test's working folder;
my_rewards.py is docs/rewards.md's own snippet.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# The one list of documented commands that do not run here: first word(s) -> why.
EXCLUDED = {
    "make setup": "creates .venv and installs packages (network)",
    "make demo": "setup, then `posttrain demo` on the real model (8 min); "
    "tests/smoke/test_demo.py runs the demo on the tiny model",
    "make test": "setup, ruff, then this whole suite: it would run itself",
    "make bench": "setup, then the benchmarks (minutes per workload)",
    ".venv/bin/pip": "installs TRL for the benchmarks (network)",
    ".venv/bin/python bench/": "benchmark harness: minutes per workload; "
    "tests/smoke/test_bench.py runs it on the tiny model",
    "python tests/smoke/fsdp_cpu_worker.py": "FSDP2 measurement on a bare loop, not a posttrain "
    "command; tests/smoke/test_fsdp_cpu.py runs it and checks the table (35 s)",
    "torchrun": "the same FSDP2 measurement in 2 processes; tests/smoke/test_fsdp_cpu.py runs it",
    "posttrain push": "uploads to the hub (network, a login); its folder is merge's, which runs",
    ".": "activates .venv, which this test already runs in",
}
# Small sizes, appended for the keys a command's config has.
TINY = {
    "run.threads": "1", "run.progress": "false",
    # online RL (reinforce, rloo, grpo, ppo)
    "steps": "1", "batch_size": "2", "samples_per_prompt": "2", "num_minibatches": "1",
    "update_epochs": "1",
    "eval_limit": "2", "n_samples": "2", "gen.max_new_tokens": "4",
    # sft, rft, distill
    "train.max_steps": "1", "train.batch_size": "2", "train.eval_batch_size": "2",
    "eval_max_new_tokens": "4", "data.max_length": "64",
    # rft: the random model answers nothing right, so the verifier keeps every sample
    "k": "2", "questions": "2", "threshold": "0",
    # dpo, reward-model: built pairs kept whatever their gap (the random model's samples score
    # alike); n 6: the reward model's recipe takes 3 pairs per prompt
    "max_steps": "1", "eval_batch_size": "2", "build.prompts": "8", "build.n": "6",
    "build.max_new_tokens": "4", "build.min_gap": "-1",
    "eval.max_new_tokens": "4",
    # tasks
    "task.train_size": "8", "task.validation_size": "2", "task.test_size": "2",
    # eval, generate
    "limit": "2", "max_new_tokens": "4", "prompting.samples": "2", "prompting.breadth": "2",
    "prompting.depth": "1", "prompting.thought_tokens": "4", "prompting.critique_tokens": "4",
}  # fmt: skip
# Hub names in the docs -> a local stand-in of the same kind ({tiny}, {classifier}: see fixture).
HUB_MODELS = {
    "HuggingFaceTB/SmolLM2-360M-Instruct": "{tiny}",
    "lvwerra/distilbert-imdb": "{classifier}",
}
# Text changes: placeholders that are not run folders; GPU configs -> the 2-process CPU config;
# paths outside the working folder.
SUBSTITUTIONS = {
    "<strategy>": "cot",
    "configs/accelerate/ddp.yaml": "configs/accelerate/cpu_2proc.yaml",
    "--num_processes 4": "--num_processes 2",
    "/tmp/": "tmp/",
}
SFT = "posttrain sft --config configs/sft_unit_conversion.toml"
RM = "posttrain reward-model --config configs/reward_model_sentiment.toml"
REINFORCE = "posttrain reinforce --config configs/reinforce_sentiment.toml"
# A run folder the docs name -> (the documented command whose run it is, the path inside that run)
RUNS = {
    "runs/<run-dir>": (f"{REINFORCE} --kl_coef=0.05", ""),
    "runs/<run>/checkpoints/step_000100/policy":
        (f"{REINFORCE} --run.threads=1", "checkpoints/*/policy"),
    "runs/<run>/final": (SFT, "final"),
    "runs/sft-unit-conversion": (SFT, ""),
    "runs/sft-unit-conversion-tools": (
        "posttrain sft --config configs/sft_unit_conversion_tools.toml", ""),
    "runs/rm-sentiment": (RM, ""),
    "runs/rm-suffix": (f"{RM} --build.enabled=false --data.source=runs/rm-sentiment/pairs.jsonl "
                       "--eval_every=24 --run.threads=1 --run.name=rm-suffix", ""),
    "runs/grpo-1":
        ("posttrain grpo --config configs/grpo_unit_conversion.toml --run.threads=1", ""),
    "runs/kl-0.01": (f"{REINFORCE} --run.threads=1", ""),
    "runs/kl-0.1": (f"{REINFORCE} --kl_coef=0.05", ""),
    "runs/kl-1": (f"{REINFORCE} --run.threads=1 --kl_coef=0.05 --exact_kl=true", ""),
    "runs/dpo-sweep-rmpairs": (
        "posttrain dpo --config configs/dpo_sentiment.toml --build.enabled=false "
        "--data.source=runs/rm-sentiment/pairs.jsonl --data.eval_fraction=0.2 "
        "--sweep.betas=[0.1,0.05,0.5] --run.name=dpo-sweep-rmpairs --run.threads=1", ""),
}  # fmt: skip
# Names that Python fragments take from their prose; built by `context` below.
CONTEXT = ("model", "tok", "task", "cfg", "device", "prompts", "completions", "batch", "run")

SFT_ROWS = [
    ("How many grams are there per 6 kg? ", "<answer>6000</answer>"),
    ("Convert 3 feet to inches. ", "<answer>36</answer>"),
    ("How many grams are there per 2 kg? ", "<answer>2000</answer>"),
    ("Convert 1 feet to inches. ", "<answer>12</answer>"),
]
TIMEOUT = 300  # the 2-process launch; a stuck collective would wait 30 minutes


def blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text()):
            if m.group(1) == lang:
                out.append((doc.relative_to(ROOT).as_posix(), m.group(2)))
    return out


def commands() -> list[tuple[str, str]]:
    """(doc, command line) for every line of a bash block; continuations joined, comments cut."""
    found = []
    for doc, text in blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                found.append((doc, re.sub(r"\s+", " ", line)))
    return found


def excluded(line: str) -> str | None:
    for prefix, why in EXCLUDED.items():
        if line == prefix or line.startswith(prefix if prefix.endswith("/") else prefix + " "):
            return why
    return None


@dataclass
class Result:
    argv: list[str]
    rc: int
    output: str
    made: list[Path] = field(default_factory=list)  # run folders the command created


class Docs:
    """Runs documented commands in a working folder, each distinct command once."""

    def __init__(self, work: Path, names: dict[str, str]):
        self.work, self.names = work, names
        self.done: dict[str, Result] = {}
        self.documented = {line for _, line in commands()}

    def fill(self, line: str) -> str:
        """Placeholders and run folders -> this session's paths (running their commands first)."""
        for old, new in SUBSTITUTIONS.items():
            line = line.replace(old, new)
        for old, new in HUB_MODELS.items():
            line = line.replace(old, new.format(**self.names))
        for key in sorted(RUNS, key=len, reverse=True):
            pattern = re.escape(key) + r"(?=[/\s\"'\]]|$)"
            if not re.search(pattern, line):
                continue
            producer, inside = RUNS[key]
            assert producer in self.documented, f"RUNS[{key!r}]: {producer!r} is not in the docs"
            made = self.run(producer)
            if made.rc != 0 or not made.made:
                pytest.fail(f"{key} comes from `{producer}`, which failed:\n{made.output[-3000:]}")
            path = made.made[0].relative_to(self.work).as_posix()
            if inside:
                hits = sorted(glob.glob(f"{path}/{inside}", root_dir=self.work))
                assert hits, f"{key}: `{producer}` made no {path}/{inside}"
                target = hits[0]
            else:
                target = path
            line = re.sub(pattern, target.replace("\\", r"\\"), line)
        return line

    def argv(self, line: str) -> list[str]:
        words = []
        for w in shlex.split(self.fill(line)):  # a shell expands globs
            hits = sorted(glob.glob(w, root_dir=self.work)) if "*" in w else []
            words += hits or [w]
        return words

    def run(self, line: str) -> Result:
        if line in self.done:
            return self.done[line]
        argv = self.argv(line)
        runs = self.work / "runs"
        before = set(runs.iterdir()) if runs.is_dir() else set()
        if argv[:2] == ["accelerate", "launch"]:
            rc, output = self.launch(argv[2:])
        else:
            assert argv[0] == "posttrain", f"not a posttrain command: {line}"
            rc, output = self.main(argv[1:])
        made = sorted(set(runs.iterdir()) - before) if runs.is_dir() else []
        self.done[line] = Result(argv, rc, output, made)
        return self.done[line]

    def main(self, argv: list[str]) -> tuple[int, str]:
        from posttrain.cli import main

        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                rc = main(argv + tiny_overrides(argv))
        except SystemExit as e:  # argparse's --help and usage errors
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            print(traceback.format_exc(), file=out)
            rc = 1
        return rc, out.getvalue()

    def launch(self, argv: list[str]) -> tuple[int, str]:
        """`accelerate launch ... -m posttrain CMD ...` in a subprocess (2 CPU processes)."""
        with socket.socket() as sock:  # a free rendezvous port: other launches may hold 29500
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        i = argv.index("-m")
        command = argv[i + 2 :]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *argv[:i]]
        cmd += ["--main_process_port", port, "-m", "posttrain", *command, *tiny_overrides(command)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        try:
            proc = subprocess.run(
                cmd, cwd=self.work, env=env, capture_output=True, text=True, timeout=TIMEOUT
            )
        except subprocess.TimeoutExpired as e:
            return 124, f"timed out after {TIMEOUT} s:\n{e.stdout or ''}{e.stderr or ''}"
        return proc.returncode, proc.stdout + proc.stderr


def tiny_overrides(argv: list[str]) -> list[str]:
    """TINY's `--key=value` for the keys that argv's command accepts."""
    import importlib

    from posttrain.cli import COMMANDS
    from posttrain.config import _field_type

    if not argv or argv[0] not in COMMANDS or "--help" in argv:
        return []
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cls = getattr(module, "COMMAND_CONFIGS", {}).get(argv[0], getattr(module, "Config", None))
    if cls is None or getattr(module, "cli", None) is not None:  # report, compare, merge
        return []
    return [f"--{k}={v}" for k, v in TINY.items() if _field_type(cls, k) is not None]


@pytest.fixture(scope="module")
def docs(tiny_dir, tmp_path_factory):
    """A working folder with the shipped configs, the docs' data files and a cache whose
    embedded default is the tiny model; cwd and POSTTRAIN_CACHE point there for the module."""
    import torch
    from conftest import build_model, build_tokenizer
    from transformers import LlamaForSequenceClassification

    work = tmp_path_factory.mktemp("docs")
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "bench").mkdir()
    (work / "bench" / "data").symlink_to(ROOT / "bench" / "data")  # the docs' question files
    (work / "tmp").mkdir()
    cache = work / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m-instruct").symlink_to(tiny_dir)
    classifier = work / "classifier"
    tok = build_tokenizer()
    cfg = build_model(tok).config
    cfg.num_labels, cfg.id2label = 2, {0: "NEGATIVE", 1: "POSITIVE"}
    cfg.label2id = {"NEGATIVE": 0, "POSITIVE": 1}
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(classifier)
    tok.save_pretrained(classifier)

    rows = [
        {"prompt": p, "completion": c, "chosen": c, "rejected": " no idea"} for p, c in SFT_ROWS
    ]
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}
        for p, c in SFT_ROWS
    ]
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    (reward,) = [code for _, code in blocks("python") if "def brevity" in code]
    (work / "my_rewards.py").write_text(reward)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("POSTTRAIN_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield Docs(work, {"tiny": str(tiny_dir), "classifier": str(classifier)})


def _id(x):
    return x[:70] if isinstance(x, str) else x


def _commands() -> list[tuple[str, str]]:
    """commands(), `posttrain <command> --help` expanded to every command."""
    from posttrain.cli import COMMANDS

    out = []
    for doc, line in commands():
        if "<command>" in line:
            out += [(doc, line.replace("<command>", c)) for c in COMMANDS]
        else:
            out.append((doc, line))
    return out


@pytest.mark.parametrize("doc, line", _commands(), ids=_id)
def test_documented_command_runs(doc, line, docs):
    why = excluded(line)
    if why:
        pytest.skip(f"EXCLUDED: {why}")
    result = docs.run(line)
    assert result.rc == 0, (
        f"{doc}: `{line}` failed (exit {result.rc}), run as\n  {shlex.join(result.argv)}\n"
        f"last output:\n{result.output[-4000:]}"
    )


def context(work: Path) -> dict:
    """CONTEXT's names: the tiny model (as `default`), the unit-conversion task with 2 test rows,
    a grpo config (for `cfg.reward`), 2 prompts with their completions and columns, a Run."""
    import torch

    from posttrain.algos.grpo import Config
    from posttrain.models import load_model
    from posttrain.runs import Run
    from posttrain.tasks import TaskConfig, columns, load_task

    model, tok = load_model("default")
    task = load_task(TaskConfig(name="unit_conversion", train_size=8, test_size=2))
    batch = columns(task.rows("test")[:2])
    cfg = Config()
    cfg.run.out_dir = str(work / "runs")
    run = Run.start(cfg.run, "snippet")
    completions = ["<answer>6000</answer>", "I do not know"]
    ns = dict(model=model, tok=tok, task=task, cfg=cfg, device=torch.device("cpu"), run=run)
    ns.update(prompts=batch["prompt"], completions=completions, batch=batch)
    assert set(ns) == set(CONTEXT)
    return ns


@pytest.mark.parametrize("doc, code", blocks("python"), ids=_id)
def test_documented_python_runs(doc, code, docs):
    ns = context(docs.work)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(compile(code, doc, "exec"), ns)
    except Exception:
        pytest.fail(f"{doc}: this snippet failed:\n{code}\n{traceback.format_exc()[-3000:]}")
