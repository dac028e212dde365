"""Two processes on a CPU (gloo) train like one process with the whole batch.

One optimizer step (sft, dpo, reward-model, grpo, rloo) launched with `accelerate launch
--config_file configs/accelerate/cpu_2proc.yaml` with 2 processes x batch 2 must give the
parameters (and the logged loss and gradient norm) of 1 process x batch 4: each process takes its own share of the step's data, the loss normaliser is
global, DDP averages the gradients. AdamW's first step is nearly scale-free (m / sqrt(v)), so
the logged gradient norm is compared too: it catches a normaliser that is off by the process count.

Online RL (grpo with the token-mean reduction, rloo with its fixed normaliser and the KL in the
reward) samples completions: each prompt's samples come from its own generator, seeded from the
run seed and the prompt's position in the global prompt stream, so the two processes' 2 prompts
each sample what the one process's 4 prompts do, and the same strict check applies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import COMMANDS, main
from posttrain.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
TIMEOUT = 300  # a process stuck in a collective would wait for gloo's 30-minute timeout

SFT_ROWS = [
    {"prompt": "How many grams are there per 6 kg? ", "completion": "<answer>6000</answer>"},
    {"prompt": "Convert 3 feet to inches. ", "completion": "<answer>36</answer>"},
    {"prompt": "This film is", "completion": " a wonderful story with good actors"},
    {"prompt": "The quick brown fox", "completion": " jumps over the lazy dog"},
]
DPO_ROWS = [
    {"prompt": "The movie was", "chosen": " great fun", "rejected": " terrible"},
    {"prompt": "This film is", "chosen": " a wonderful story", "rejected": " boring and bad"},
    {"prompt": "The actors were", "chosen": " good actors", "rejected": " a bad ending"},
    {"prompt": "The story is", "chosen": " fun and great", "rejected": " terrible boring"},
]
REWARD_PY = """
def chars(prompts, completions, batch):
    return [len(c) / 10 for c in completions]

def chars_some_skipped(prompts, completions, batch):
    return [float("nan") if skipped(q) else len(c) / 10
            for c, q in zip(completions, batch["question"])]

def skipped(question):
    return len(question) % 3 == 0
"""


def _skipped_per_process() -> list[int]:
    """Samples that grpo's reward skips on each of the 2 processes (2 prompts x 2 samples each)."""
    from posttrain import tasks
    from posttrain.online import PromptStream
    from posttrain.tasks.base import TaskConfig

    code: dict = {}
    exec(REWARD_PY, code)
    rows = tasks.load_task(TaskConfig(name="unit_conversion", train_size=8)).rows("train")
    draws = [PromptStream(rows, 0, rank, 2).next(2) for rank in (0, 1)]
    return [2 * sum(code["skipped"](r["question"]) for r in d) for d in draws]


def _exists(module: str) -> bool:
    return (ROOT / "src" / Path(*module.split("."))).with_suffix(".py").is_file()


def _args(command: str, tiny_dir: Path, tmp_path: Path, name: str, batch: int) -> list[str]:
    common = [
        "--model.name", str(tiny_dir), "--run.out_dir", str(tmp_path / "runs"),
        "--run.name", name, "--run.progress=false", "--run.threads=1", "--optim.lr=1e-2",
    ]  # fmt: skip
    if command == "sft":
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
        return ["sft", *common, "--data.source", str(data), "--data.validation_size=0", "--lora.enabled=false",
                f"--train.batch_size={batch}", "--train.max_steps=1", "--optim.warmup_steps=0"]  # fmt: skip
    if command == "dpo":
        data = tmp_path / "dpo.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in DPO_ROWS))
        # Adam's eps 1e-6: at step 1 (margin 0) chosen and rejected gradients nearly cancel in
        # lm_head rows, and m / (sqrt(v) + 1e-8) turns summation-order noise there (4 vs 2 pairs
        # per forward) into 4e-5 weight differences
        return ["dpo", *common, "--data.source", str(data), "--data.eval_fraction=0",
                f"--batch_size={batch}", "--max_steps=1", "--optim.eps=1e-6"]  # fmt: skip
    if command == "reward-model":  # the same pairs as dpo; the new scoring head is seeded
        data = tmp_path / "rm.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in DPO_ROWS))
        return ["reward-model", *common, "--data.source", str(data), "--data.eval_fraction=0",
                f"--batch_size={batch}", "--max_steps=1", "--optim.eps=1e-6"]  # fmt: skip
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    # grpo: the token mean over the step's tokens on all processes, with the samples of some
    # questions skipped (left out of the loss): the processes hold different numbers of tokens;
    # rloo: its defaults. Adam's eps 1e-6: the group-centred advantages nearly cancel, leaving
    # gradient elements near 1e-8 where m / (sqrt(v) + 1e-8) would turn summation-order noise
    # into 3e-5 weight differences.
    extra = ["--optim.eps=1e-6"]
    if command == "grpo":
        extra += ["--loss_reduction=token_mean", f"--reward.components=python:{reward}:chars_some_skipped",
                  "--reward.on_error=skip"]  # fmt: skip
    else:
        extra += [f"--reward.components=python:{reward}:chars"]
    return [command, *common, "--task.name", "unit_conversion", "--task.train_size", "8",
            "--gen.max_new_tokens", "6", f"--batch_size={batch}", "--samples_per_prompt=2", "--steps=1",
            "--eval_limit=0", *extra]  # fmt: skip


# Runs several CLI commands in the same 2 processes (one launch: starting processes is the slow
# part), recording each command's outcome per rank. A command that raises ends the launch (the
# other rank would wait in a collective forever); the fixture relaunches the commands left. Every
# non-main process also writes the modules it checkpoints to RUN/rank<r>/, so the test can check
# that DDP kept the processes in sync. signal.alarm ends a worker that hangs all the same.
WRAPPER = """
import json, os, signal, sys, traceback
from pathlib import Path
signal.alarm(int(os.environ["POSTTRAIN_TEST_TIMEOUT"]))
from posttrain import runs
from posttrain.cli import main
save = runs.Run.save_checkpoint
def save_checkpoint(self, step, modules, *args, **kwargs):
    if not self.is_main:
        for name, module in modules.items():
            runs.save_module(module, self.path / f"rank{os.environ['RANK']}" / name)
    return save(self, step, modules, *args, **kwargs)
runs.Run.save_checkpoint = save_checkpoint
commands = Path(sys.argv[1])
out = commands.with_name(f"status_{os.environ['RANK']}.json")
status = json.loads(out.read_text()) if out.is_file() else {}
for name, argv in json.loads(commands.read_text()).items():
    if name in status:
        continue
    try:
        status[name] = main(argv)
    except BaseException:
        status[name] = traceback.format_exc()
    out.write_text(json.dumps(status))
    if status[name] != 0:
        os._exit(1)
"""


def launch(commands: dict[str, list[str]], tmp_path: Path) -> str:
    """Run the commands not yet done under
    `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml`; returns the output."""
    (tmp_path / "posttrain_2proc.py").write_text(WRAPPER)
    (tmp_path / "commands.json").write_text(json.dumps(commands))
    with socket.socket() as sock:  # a free rendezvous port: other launches may hold 29500
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC)]
    cmd += ["--main_process_port", str(port)]
    cmd += [str(tmp_path / "posttrain_2proc.py"), str(tmp_path / "commands.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env["POSTTRAIN_TEST_TIMEOUT"] = str(TIMEOUT)
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        return proc.communicate(timeout=TIMEOUT + 30)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to the workers
        return proc.communicate()[0]


@pytest.fixture(scope="module")
def two_procs(tiny_dir, tmp_path_factory):
    """(folder, rank -> command -> 0 or the error): one step each, 2 processes x batch 2."""
    tmp = tmp_path_factory.mktemp("two-procs")
    commands = {
        c: _args(c, tiny_dir, tmp, f"{c}-two", batch=2)
        for c in ("sft", "dpo", "reward-model", "grpo", "rloo")
        if _exists(COMMANDS[c][0])
    }
    status: dict[int, dict] = {0: {}, 1: {}}
    for _ in commands:  # one launch, and one more after each command that fails
        before = set(status[0])
        out = launch(commands, tmp)
        for rank in (0, 1):
            f = tmp / f"status_{rank}.json"
            status[rank] = json.loads(f.read_text()) if f.is_file() else {}
        done = set(status[0]) | set(status[1])
        if done == before:
            pytest.fail(f"the 2-process launch ran no command:\n{out[-6000:]}")
        for name in done:  # what one rank failed is over for both; the next launch skips it
            for rank in (0, 1):
                status[rank].setdefault(name, "not finished: the other process failed")
                (tmp / f"status_{rank}.json").write_text(json.dumps(status[rank]))
        if set(commands) <= done:
            break
    return tmp, status


def ran(two_procs, command: str) -> Path:
    tmp, status = two_procs
    if command not in status[0] and not _exists(COMMANDS[command][0]):
        pytest.skip(f"{command} is not implemented yet")
    for rank in (0, 1):
        assert status[rank][command] == 0, f"{command} on rank {rank}: {status[rank][command]}"
    return tmp / "runs" / f"{command}-two"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors files under folder, keyed by file and name."""
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no weights under {folder}"
    out = {}
    for f in files:
        rel = f.relative_to(folder).as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def checkpoint(run: Path) -> Path:
    (ckpt,) = sorted((run / "checkpoints").glob("step_*"))
    return ckpt


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {
        k: float((a[k] - b[k]).abs().max())
        for k in a
        # DDP's all-reduce sums gradients in another order than one backward: float noise
        if not torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-5)
    }


def train_record(run: Path) -> dict:
    """The one training record (step 1) of metrics.jsonl: written once, by the main process."""
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if "lr" in r]
    assert [r["step"] for r in recs] == [1], read_jsonl(run / "metrics.jsonl")
    return recs[0]


def check_in_sync(run: Path) -> dict[str, torch.Tensor]:
    """Rank 0's checkpoint equals rank 1's weights; one run directory; returns rank 0's."""
    main_w = {k: v for k, v in weights(checkpoint(run)).items()}
    rank1 = weights(run / "rank1")
    main_w = {k: v for k, v in main_w.items() if k in rank1}
    assert main_w, "rank 1 dumped no module that the main process checkpointed"
    diff = differing(main_w, rank1)
    assert not diff, f"the processes ended with different weights: {diff}"
    return main_w


@pytest.mark.parametrize("command", ["sft", "dpo", "reward-model", "grpo", "rloo"])
def test_two_processes_equal_one_with_the_whole_batch(command, two_procs, tiny_dir, tmp_path):
    two = ran(two_procs, command)
    assert len(list(two.parent.glob(f"{command}-two*"))) == 1, "one run directory, not one each"
    assert main(_args(command, tiny_dir, tmp_path, "one", batch=4)) == 0
    one = tmp_path / "runs" / "one"
    w2 = check_in_sync(two)
    w1 = {k: v for k, v in weights(checkpoint(one)).items() if k in w2}
    start = load_file(str(tiny_dir / "model.safetensors"))
    moved = [k for k, v in w1.items() if not torch.equal(v, start.get(k.split(":")[1], v))]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    r1, r2 = train_record(one), train_record(two)
    if command == "grpo":  # the processes' loss tokens differ: a local token mean would be wrong
        assert _skipped_per_process() == [2, 0] and r1["reward/skipped"] == 2
    # online RL's first-step loss is ~0 (on-policy ratio 1, advantages centred): float noise
    # around 1e-8 there, hence the absolute tolerance; the gradient norm carries the check
    loss = "loss/total" if command in ("grpo", "rloo") else "loss"
    problems = [
        f"{key}: 1 x 4 logged {r1[key]:.6g}, 2 x 2 logged {r2[key]:.6g}"
        for key in (loss, "grad_norm")
        if r2[key] != pytest.approx(r1[key], rel=1e-4, abs=1e-6)
    ]
    diff = differing(w1, w2)
    if diff:
        problems.append(
            f"{len(diff)} of {len(w1)} tensors differ (max abs diff {max(diff.values()):.3g})"
        )
    assert not problems, f"{command}: 2 processes x batch 2 != 1 process x batch 4: {problems}"


@pytest.mark.parametrize(
    "name, kind",
    [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
     ("deepspeed_zero3", "DEEPSPEED"), ("cpu_2proc", "MULTI_GPU")],
)  # fmt: skip
def test_shipped_accelerate_configs_parse(name, kind):
    """The example configs of docs/scaling.md load with accelerate's own parser."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind and cfg.num_machines == 1
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2
    if name == "cpu_2proc":
        assert cfg.num_processes == 2 and cfg.mixed_precision == "no"
