"""Every shipped config runs, and its run directory gives a report that opens in a browser.

For each configs/*.toml: the command its name starts with loads it through the CLI
(`--config FILE`) with overrides that make it tiny (the tiny model of tests/conftest.py, one or two
steps, a few rows, a few new tokens, one thread), runs it, builds `posttrain report RUN_DIR` and
opens the page in headless chromium (tests/browser.py): no error logged, every image
decoded, nothing fetched but data: URIs. Everything else in the config (task, strategy, reward,
LoRA, reductions, KL settings, pair building) is the shipped one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tomllib
from browser import assert_clean

from posttrain.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

# file name prefix -> command (configs/accelerate/*.yaml are accelerate's, not posttrain's)
COMMANDS = {
    "sft_": "sft",
    "rft_": "rft",
    "grpo_": "grpo",
    "rloo_": "rloo",
    "ppo_": "ppo",
    "reinforce_": "reinforce",
    "dpo_": "dpo",
    "reward_model_": "reward-model",
    "distill": "distill",
    "eval_": "eval",
}

# task data: a few rows per split, short texts
TASK = [
    "--task.train_size=8",
    "--task.validation_size=2",
    "--task.test_size=2",
    "--task.article_tokens=24",
    "--task.completion_tokens=4",
]
ONLINE = [
    "--steps=1",
    "--batch_size=2",
    "--eval_limit=2",
    "--gen.max_new_tokens=4",
    "--gen.max_prompt_tokens=96",
    "--run.sample_every=1",
]
# pairs built from the policy's own samples: the tiny model's gibberish mostly ties under VADER
# (no sentiment words), so min_gap -1 keeps every pair of distinct texts
PAIRS = [
    "--build.prompts=6",
    "--build.n=6",  # the reward-model config keeps 3 disjoint pairs per prompt
    "--build.min_gap=-1",
    "--data.max_completion_tokens=4",
    "--max_steps=1",
    "--batch_size=2",
    "--eval_batch_size=4",
]
SUPERVISED = [
    "--train.max_steps=1",
    "--train.batch_size=2",
    "--train.eval_every=0",
    "--eval_limit=2",
    "--eval_max_new_tokens=4",
]
TINY: dict[str, list[str]] = {
    "sft": [*SUPERVISED, "--data.max_length=48"],
    "distill": [*SUPERVISED, "--data.max_length=48"],  # the teacher: tiny_args
    # rft: the tiny model is never right; verifier threshold 0 keeps every sample
    "rft": [
        *SUPERVISED,
        "--max_length=48",
        "--k=2",
        "--questions=2",
        "--gen.max_new_tokens=4",
        "--threshold=0",
    ],
    "grpo": [*ONLINE, "--samples_per_prompt=2"],
    "rloo": [*ONLINE, "--samples_per_prompt=2"],
    "reinforce": ONLINE,
    "ppo": [*ONLINE, "--num_minibatches=1", "--update_epochs=1"],
    "dpo": [*PAIRS, "--eval_limit=2", "--eval.max_new_tokens=4"],
    "reward-model": PAIRS,
    "eval": [
        "--limit=2",
        "--max_new_tokens=4",
        "--prompting.shots=1",
        "--prompting.samples=2",
        "--prompting.breadth=2",
        "--prompting.depth=1",
        "--prompting.thought_tokens=4",
        "--prompting.critique_tokens=4",
    ],
}


def command_of(config: Path) -> str:
    for prefix, command in COMMANDS.items():
        if config.name.startswith(prefix):
            return command
    raise AssertionError(
        f"configs/{config.name}: no command for this file name; name it after its command "
        f"({', '.join(COMMANDS)}) or add its prefix to COMMANDS here"
    )


def tiny_args(config: Path, tiny_dir: Path, out: Path) -> list[str]:
    command = command_of(config)
    model = ["--models", str(tiny_dir)] if command == "eval" else ["--model.name", str(tiny_dir)]
    if command == "distill":
        model += ["--teacher.name", str(tiny_dir)]
    run = ["--run.out_dir", str(out), "--run.name", config.stem, "--run.threads=1",
           "--run.progress=false"]  # fmt: skip
    return [command, "--config", str(config), *model, *run, *TASK, *TINY[command]]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_runs_and_reports(config, tiny_dir, tmp_path, browser):
    t0 = time.perf_counter()
    assert main(tiny_args(config, tiny_dir, tmp_path)) == 0
    t1 = time.perf_counter()
    run = tmp_path / config.stem
    # the run used the shipped file: its task, and its LoRA setting where it has one
    shipped = tomllib.loads(config.read_text())
    resolved = tomllib.loads((run / "config.toml").read_text())
    assert resolved["task"]["name"] == shipped["task"]["name"]
    if "lora" in shipped:
        assert resolved["lora"] == {**resolved["lora"], **shipped["lora"]}
    assert main(["report", str(run)]) == 0
    images = len(list((run / "plots").glob("*.png"))) + len(list(run.glob("*.png")))
    facts = browser.check(run / "report.html")
    if command_of(config) != "eval":  # training curves (eval runs have a table, maybe a figure)
        # one step logs the loss once: the report shows it as a number, not a one-dot chart
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r for r in records if "loss" in r or "loss/total" in r]
        if len(losses) > 1:
            assert (run / "plots" / "loss.png").is_file()
        else:
            assert len(losses) == 1 and "Logged once" in facts["text"]
    print(f"{config.name}: run {t1 - t0:.1f}s, report + browser {time.perf_counter() - t1:.1f}s")
    assert_clean(facts, images=images)
    assert facts["title"] == f"posttrain report: {config.stem}"
    assert "Resolved config" in facts["text"]
