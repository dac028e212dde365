"""posttrain next to Hugging Face TRL: seconds per optimizer step, generation tokens/s, peak RSS.

    pip install -e ".[bench]"            # TRL is a bench extra, never a runtime dependency
    python bench/trl_compare.py                           # every workload, 3 rounds x 8 steps, fp32
    python bench/trl_compare.py --workloads grpo,rloo --steps 8 --rounds 3 --dtype bfloat16
    python bench/trl_compare.py --settings each           # each side's own process settings

Fair by construction (issue #15):
- Same process settings (`--settings same`, the default): both children start with the same
  allocator settings (glibc `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`, what
  posttrain's `run.reuse_memory` sets for itself) and the same torch/OpenMP threads. `--settings
  each` leaves TRL's child on the default allocator: the "out of the box" table.
- TRL runs with its own default optimizer (transformers' `adamw_torch_fused`) and the speed
  settings its docs recommend that apply on a CPU: truncation to the data's length, no gradient
  checkpointing, precomputed reference log-probs for DPO. (Packing, padding-free batches, Liger
  kernels and vLLM need FlashAttention or a GPU.)
- Equal work: both sides read the same rows in the same order (sequential on both: TRL's
  `train_sampling_strategy="sequential"` / `shuffle_dataset=False`, posttrain's data order patched
  to the file's in the child), and every child logs the padded and the real (attention-mask)
  tokens that each step's training forwards take. For SFT and DPO the first step's loss (and
  DPO's chosen/rejected log-probs) must agree between the sides to a relative 1e-4 (fp32), or the
  row is refused.
- Rounds: each round runs both sides of every workload; the table gives the median over rounds of
  the per-round ratio and its spread (min-max). Before each child the parent waits for a quiet
  machine (other processes' CPU use under `--quiet-load` cores) and records the other processes'
  load while the child ran.

Each (workload, side) runs in its own subprocess, so the peak RSS (`ru_maxrss` of the child) is that
side's alone; the two sides alternate within one run (posttrain first for one workload, TRL first
for the next, and the order flips every round), so a change in machine load hits both. A child
trains `warmup + steps` optimizer steps and exits right after the last one (no final checkpoint,
evaluation or save on either side). One step's time is the wall time between the ends of two
consecutive optimizer steps: data, generation, reward, reference, forward, backward, optimizer and
the step's log line all count, on both sides. The table gives the median over the timed steps.

posttrain runs through its CLI in-process (`posttrain.cli.main`), unchanged; the child only wraps
`Run.log` (the end of a step) and `rollout.generate` (generation time and tokens) to time them. TRL
runs its trainers (SFTTrainer, DPOTrainer, GRPOTrainer, RLOOTrainer) with a TrainerCallback at each
step end, and its generation (`_generate_single_turn`) wrapped the same way.

PPO against PPO (the `ppo` and `ppo_plain` rows): TRL dropped PPOTrainer after 1.12, so the TRL side
of these rows runs TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` from its own virtual environment,
`bench/.venv-trl112` (`make bench-trl112-venv`; the harness refuses these rows without it). That
child needs no posttrain: the parent resolves the model directory and writes the prompt texts for
it. Both sides get the same prompts in the same order (TRL's shuffled DataLoader is patched to the
file's order), 8 prompts x 1 completion, fp32, a separate value model (posttrain `critic=separate`:
a copy of the policy with a scalar head; TRL: an AutoModelForSequenceClassification on the same
weights) and the same reward model (the policy's weights with a seeded scalar head, saved once by
the parent: posttrain reads it as `reward.components=model:<dir>`, TRL as `reward_model`).
TRL has no REINFORCE any more: the reinforce rows (not in the default list) compare against TRL's
RLOO at the same generated token count and say nothing about REINFORCE against REINFORCE.
Both sides: fp32 (or bf16 autocast with --dtype bfloat16), no gradient checkpointing (TRL's
default is on), CPU, the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from limits import (  # noqa: E402
    ModelCounts,
    Peaks,
    causal_context,
    forward_flops,
    measure_peaks,
    model_counts,
    pct_of_limit,
    rollout_seconds,
    train_flops,
    train_limit_seconds,
)
from workloads import (  # noqa: E402
    COMMON,
    DEFAULT_WORKLOADS,
    TRL_ENVS,
    WORKLOADS,
    Workload,
    dpo_rows,
    plain_prompt,
    plain_prompts,
    prompt_messages,
    sft_rows,
)

SIDES = ("posttrain", "trl")
# glibc's allocator settings that posttrain's run.reuse_memory makes for itself (mallopt), as
# environment variables: under --settings same both children start with them
SAME_ALLOCATOR = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}
# SFT/DPO first-step metrics that both sides log and that must agree (relative, fp32)
AGREE_KEYS = ("loss", "logps/chosen", "logps/rejected")
AGREE_RTOL = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="`default` or a local model directory")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    ap.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated, from: {', '.join(WORKLOADS)}",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each child")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="bfloat16: bf16 autocast on both sides (weights stay fp32)")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=3, help="repeat each pair of runs")
    ap.add_argument("--settings", choices=["same", "each"], default="same",
                    help="same: both children get the same allocator settings and threads; "
                    "each: TRL's child keeps the default allocator (out of the box)")  # fmt: skip
    ap.add_argument("--quiet-load", type=float, default=0.3,
                    help="wait before each child until other processes use fewer cores than this")  # fmt: skip
    ap.add_argument("--quiet-wait", type=int, default=300,
                    help="most seconds to wait for a quiet machine before a child")  # fmt: skip
    ap.add_argument("--max-length", type=int, default=128, help="SFT/DPO longest sequence")
    ap.add_argument("--sides", default="posttrain,trl", help="which sides to run")
    ap.add_argument(
        "--posttrain-args",
        default="",
        help="extra overrides for posttrain's training commands, e.g. "
        "'--run.onednn=false --run.reuse_memory=false' (not the generate workload)",
    )
    ap.add_argument(
        "--timeout", type=int, default=1800, help="seconds per child before it is killed"
    )
    ap.add_argument("--limits", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the machine's matmul peak and read bandwidth first, and print "
                    "each row's limit and %% of it")  # fmt: skip
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--report", default=None, help="only print the table of an --out file")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--reward-model", help=argparse.SUPPRESS)  # ppo: the shared reward model's dir
    ap.add_argument("--prompts", help=argparse.SUPPRESS)  # ppo, TRL side: the prompt texts (JSON)
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1: a step is timed from the end of the one before")
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    unknown = [w for w in args.workloads.split(",") if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    bad = [s for s in args.sides.split(",") if s not in SIDES]
    if bad:
        ap.error(f"unknown side(s) {', '.join(bad)}; choose from {', '.join(SIDES)}")
    return args


# ---------------------------------------------------------------------------------------------
# In the child: a recorder of step ends and generation calls


class Recorder:
    """Step-end times and generation calls; writes the result and exits after the last step."""

    def __init__(self, args: argparse.Namespace, side: str, w: Workload):
        self.args, self.side, self.w = args, side, w
        self.total = args.warmup + args.steps
        self.ends: list[float] = []
        self.gens: list[tuple[int, int, float]] = []  # (step it belongs to, tokens, seconds)
        self.tokens: dict[int, list[int]] = {}  # step -> [padded, real] tokens in grad forwards
        self.first: dict[str, float] = {}  # the first step's logged metrics (AGREE_KEYS)
        self.extra: dict[str, Any] = {}
        self.start = time.perf_counter()

    def generated(self, tokens: int, seconds: float) -> None:
        self.gens.append((len(self.ends) + 1, tokens, seconds))

    def logged(self, step: int, metrics: dict[str, Any]) -> None:
        if step == 1 and not self.first:
            self.first = {k: float(metrics[k]) for k in AGREE_KEYS if k in metrics}

    def count_tokens(self, model: Any) -> None:
        """Count the padded and real tokens of every forward with gradients on (training
        forwards, not sampling or reference scoring) through the model's decoder stack."""
        import torch

        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model

        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            if not torch.is_grad_enabled():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                ids = kwargs["inputs_embeds"][..., 0]
            mask = kwargs.get("attention_mask")
            real = None
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # (B, past + T): the new T
                real = int(mask[:, -ids.shape[-1] :].sum())
            cur = self.tokens.setdefault(len(self.ends) + 1, [0, 0])
            cur[0] += ids.numel()
            cur[1] += ids.numel() if real is None else real

        decoder.register_forward_pre_hook(hook, with_kwargs=True)

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())
        if len(self.ends) >= self.total:
            self.finish()

    def finish(self) -> None:
        import resource

        w = self.args.warmup
        steps = [b - a for a, b in zip(self.ends[w - 1 :], self.ends[w:])]
        timed = [g for g in self.gens if g[0] > w]
        res = {
            "side": self.side,
            "workload": self.w.name,
            "step_seconds": steps,
            "first_step": self.first,
            # [padded, real] tokens of the training forwards, per step (warm-up steps included)
            "step_tokens": [self.tokens.get(i, [0, 0]) for i in range(1, self.total + 1)],
            **self.extra,
            "gen_tokens": sum(g[1] for g in timed),
            "gen_seconds": sum(g[2] for g in timed),
            "gen_calls": len(timed),
            # Linux reports ru_maxrss in KiB (macOS in bytes)
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / (2**20 if sys.platform == "darwin" else 2**10),
            "wall_seconds": time.perf_counter() - self.start,
        }
        Path(self.args.result).write_text(json.dumps(res))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip the final checkpoint/save/eval of either library


def model_dir(name: str) -> str:
    if name in ("default", "smollm2", "smollm2-135m-instruct"):
        from posttrain.models import embedded_dir

        return str(embedded_dir())
    return name


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# posttrain side: the CLI, in-process


def posttrain_argv(w: Workload, args: argparse.Namespace, tok: Any, tmp: Path) -> list[str]:
    total = args.warmup + args.steps
    common = [
        f"--model.name={model_dir(args.model)}",
        "--model.dtype=float32",
        f"--run.autocast={'bfloat16' if args.dtype == 'bfloat16' else 'no'}",
        f"--optim.lr={w.lr}",
        "--optim.warmup_steps=0",
        "--optim.schedule=constant",
        "--optim.weight_decay=0",
        # TRL 1.12's PPOTrainer never clips the gradient: nor does posttrain's side of its row
        f"--optim.max_grad_norm={0 if w.kind == 'ppo' else 1.0}",
        "--optim.grad_accum=1",
        f"--run.out_dir={tmp / 'runs'}",
        f"--run.threads={args.threads}",
        "--run.progress=false",
        "--run.save_every=0",
        "--run.seed=0",
        f"--lora.enabled={str(w.lora).lower()}",
        "--lora.r=16",
        "--lora.alpha=32",
        "--lora.dropout=0",
    ]
    n_rows = max(total * w.batch, 16)
    if w.kind == "sft":
        data = write_jsonl(tmp / "sft.jsonl", sft_rows(tok, n_rows, w.plain))
        return ["sft", *common, f"--data.source={data}", "--data.format=prompt_completion",
                "--data.validation_size=0", f"--data.max_length={args.max_length}",
                f"--train.batch_size={w.batch}", f"--train.max_steps={total}",
                "--train.eval_every=0", "--eval_limit=0"]  # fmt: skip
    if w.kind == "dpo":
        data = write_jsonl(tmp / "pairs.jsonl", dpo_rows(tok, n_rows, w.plain))
        return ["dpo", *common, f"--data.source={data}", "--data.eval_fraction=0",
                f"--data.max_prompt_tokens={args.max_length}",
                f"--data.max_completion_tokens={args.max_length}", "--beta=0.1",
                "--loss_type=dpo", "--reference=precomputed", f"--batch_size={w.batch}",
                f"--max_steps={total}", f"--eval_batch_size={w.batch}"]  # fmt: skip
    reward = f"--reward.components=python:{HERE / 'workloads.py'}:posttrain_reward"
    if w.kind == "ppo":  # the reward model that TRL's PPOTrainer gets too (make_reward_model)
        reward = f"--reward.components=model:{args.reward_model}"
    online = [*common, "--task.name=unit_conversion", reward, f"--gen.max_new_tokens={w.new_tokens}",
              "--gen.temperature=1.0", "--gen.top_k=0", "--gen.top_p=1.0", "--gen.stop=[]",
              f"--gen.chat={str(not w.plain).lower()}", f"--steps={total}", "--eval_limit=0",
              "--run.sample_every=0"]  # fmt: skip
    if w.kind in ("grpo", "rloo"):
        return [w.kind, *online, f"--batch_size={w.batch // w.group}", f"--samples_per_prompt={w.group}",
                f"--kl_coef={w.kl}", "--update_epochs=1", "--num_minibatches=1",
                "--clip_range=0.2"]  # fmt: skip
    if w.kind == "reinforce":
        return ["reinforce", *online, f"--batch_size={w.batch // w.group}", f"--samples_per_prompt={w.group}",
                f"--kl_coef={w.kl}", "--baseline=moving_average"]  # fmt: skip
    if w.kind == "ppo":  # TRL 1.12 PPOConfig's settings, each named (see run_trl_ppo)
        return ["ppo", *online, f"--batch_size={w.batch // w.group}", f"--samples_per_prompt={w.group}",
                "--num_minibatches=1", "--update_epochs=1", f"--kl_coef={w.kl}",
                "--kl_controller=fixed", "--kl_estimator=k1", "--ref=copy", "--critic=separate",
                "--whiten_advantages=true", "--whiten_rewards=false", "--vf_coef=0.1",
                "--ent_coef=0", "--clip_range=0.2", "--clip_range_value=0.2", "--gamma=1.0",
                "--lam=0.95", "--loss_reduction=token_mean", f"--forward_batch_size={w.batch}",
                f"--reward.batch_size={w.batch}"]  # fmt: skip
    raise ValueError(f"no posttrain command for workload kind {w.kind!r}")


def same_order() -> None:
    """posttrain reads its data in the file's order, as TRL does with a sequential sampler: the
    offline loop's micro-batches and the online prompt stream, without their seeded shuffles."""
    import posttrain.data as data
    import posttrain.offline as offline
    from posttrain.online import PromptStream

    load_rows = data.load_rows

    def file_order(cfg: Any) -> tuple[list[dict], list[dict], str]:
        # without a validation share posttrain still permutes the rows: put them back in order
        train, val, fmt = load_rows(cfg)
        if cfg.data.source and not val:
            lines = Path(cfg.data.source).read_text().splitlines()
            pos = {json.dumps(json.loads(x), sort_keys=True): i for i, x in enumerate(lines)}
            train.sort(key=lambda r: pos[json.dumps(r, sort_keys=True)])
        return train, val, fmt

    data.load_rows = file_order
    import posttrain.algos.sft as sft

    sft.load_rows = file_order

    def micro_batches(step: int, n_items: int, *, batch_size: int, grad_accum: int,
                      processes: int, rank: int, seed: int) -> list[list[int]]:  # fmt: skip
        per_step = batch_size * grad_accum * processes
        i = step % offline.steps_per_epoch(n_items, per_step, processes)
        mine = list(range(i * per_step, (i + 1) * per_step))[rank::processes]
        return [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]

    offline.micro_batches = micro_batches
    PromptStream._order = lambda self, epoch: list(range(len(self.rows)))  # type: ignore[method-assign]


def plain_stream() -> None:
    """The online prompt stream hands out the plain question instead of the chat messages."""
    from posttrain.online import PromptStream

    init = PromptStream.__init__

    def plain_init(self: Any, rows: list[dict[str, Any]], *a: Any, **k: Any) -> None:
        init(self, [{**r, "prompt": plain_prompt(r)} for r in rows], *a, **k)

    PromptStream.__init__ = plain_init  # type: ignore[method-assign]


def run_posttrain(w: Workload, args: argparse.Namespace, rec: Recorder, tmp: Path) -> None:

    import posttrain.models as models
    import posttrain.rollout as rollout
    from posttrain.models import load_tokenizer
    from posttrain.runs import Run

    same_order()
    if w.plain:
        plain_stream()
    orig_load = models.load_model

    def load_model(*a: Any, **k: Any) -> Any:
        model, tok_ = orig_load(*a, **k)
        rec.count_tokens(model)
        return model, tok_

    models.load_model = load_model
    tok = load_tokenizer(model_dir(args.model))
    orig_generate = rollout.generate

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        roll = orig_generate(*a, **k)
        rec.generated(roll.num_tokens, time.perf_counter() - t0)
        return roll

    rollout.generate = timed_generate  # the algorithms import it inside main()
    if w.kind == "generate":
        run_generate_posttrain(w, args, rec, tok)
        return
    logged: set[int] = set()
    orig_log = Run.log

    def log(self: Run, step: int, metrics: dict[str, Any], echo: bool = True) -> dict[str, Any]:
        rec.logged(step, metrics)
        if step not in logged and step > 0:  # one step end per optimizer step
            logged.add(step)
            rec.step_end()
        return orig_log(self, step, metrics, echo=echo)  # TRL prints its log lines too

    Run.log = log  # type: ignore[method-assign]
    from posttrain.cli import main

    rc = main(posttrain_argv(w, args, tok, tmp) + shlex.split(args.posttrain_args))
    raise SystemExit(f"posttrain {w.kind} ended (rc={rc}) before {rec.total} steps were logged")


def run_generate_posttrain(w: Workload, args: argparse.Namespace, rec: Recorder, tok: Any) -> None:
    import torch

    import posttrain.rollout as rollout
    from posttrain.models import load_model

    model, _ = load_model(model_dir(args.model), dtype="float32")
    gen = rollout.GenerationConfig(
        max_new_tokens=w.new_tokens, temperature=1.0, n=w.group, chat=True
    )
    prompts = prompt_messages(rec.total * w.batch // w.group)
    per = w.batch // w.group
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        for s in range(rec.total):
            rollout.generate(model, tok, prompts[s * per : (s + 1) * per], gen)
            rec.step_end()


# ---------------------------------------------------------------------------------------------
# TRL side: its trainers with a step-end callback


def trl_common(w: Workload, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    return dict(
        output_dir=str(tmp / "trl"),
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=w.batch,
        gradient_accumulation_steps=1,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        # optim: TRL's own default (transformers' adamw_torch_fused), not forced
        train_sampling_strategy="sequential",  # the rows in the file's order, as posttrain's child
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=args.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


def step_end_callback(rec: Recorder) -> Any:
    """A TrainerCallback that tells the recorder of each step end and log line."""
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            rec.step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            rec.logged(state.global_step, logs or {})

    return StepEnd()


def run_trl(w: Workload, args: argparse.Namespace, rec: Recorder, tmp: Path) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rec.extra["trl_version"] = trl.__version__
    if w.kind == "ppo":
        run_trl_ppo(w, args, rec, tmp)
        return
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if w.kind == "generate":
        run_generate_trl(w, args, rec, tok, path)
        return
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rec.count_tokens(model)
    peft_config = None
    if w.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    common = trl_common(w, args, tmp)
    n_rows = max(rec.total * w.batch, 16)
    if w.kind == "sft":
        from trl import SFTConfig, SFTTrainer

        cfg = SFTConfig(
            **common, max_length=args.max_length, completion_only_loss=True, packing=False
        )
        trainer: Any = SFTTrainer(model=model, args=cfg, processing_class=tok,
                                  train_dataset=Dataset.from_list(sft_rows(tok, n_rows, w.plain)),
                                  peft_config=peft_config, callbacks=[step_end_callback(rec)])  # fmt: skip
    elif w.kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        # posttrain keeps prompt and completion up to max_length tokens each, whole: TRL's
        # max_length bounds their sum, so 2 x max_length keeps TRL from truncating (same tokens)
        cfg = DPOConfig(**common, max_length=2 * args.max_length, beta=0.1, loss_type=["sigmoid"],
                        precompute_ref_log_probs=True, precompute_ref_batch_size=w.batch)  # fmt: skip
        trainer = DPOTrainer(model=model, args=cfg, processing_class=tok,
                             train_dataset=Dataset.from_list(dpo_rows(tok, n_rows, w.plain)),
                             peft_config=peft_config, callbacks=[step_end_callback(rec)])  # fmt: skip
    else:
        from workloads import trl_reward

        online = dict(num_generations=4, max_completion_length=w.new_tokens, temperature=1.0,
                      top_k=0, top_p=1.0, beta=w.trl_kl, num_iterations=1, epsilon=0.2,
                      log_completions=False, shuffle_dataset=False)  # fmt: skip
        prompts = plain_prompts(n_rows) if w.plain else prompt_messages(n_rows)
        data = Dataset.from_list([{"prompt": p} for p in prompts])
        if w.kind == "grpo":
            from trl import GRPOConfig, GRPOTrainer

            cfg = GRPOConfig(**common, **online, loss_type="grpo", scale_rewards="group")
            trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=cfg,
                                  processing_class=tok, train_dataset=data,
                                  peft_config=peft_config, callbacks=[step_end_callback(rec)])  # fmt: skip
        else:  # rloo, and TRL's stand-in for reinforce
            from trl import RLOOConfig, RLOOTrainer

            cfg = RLOOConfig(**common, **online)
            trainer = RLOOTrainer(model=model, reward_funcs=trl_reward, args=cfg,
                                  processing_class=tok, train_dataset=data,
                                  peft_config=peft_config, callbacks=[step_end_callback(rec)])  # fmt: skip
        orig = trainer._generate_single_turn

        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            out = orig(*a, **k)
            ids = out[0] if isinstance(out, tuple) else out  # GRPO also returns logprobs
            rec.generated(sum(len(x) for x in ids), time.perf_counter() - t0)
            return out

        trainer._generate_single_turn = timed
    rec.extra["trl_optim"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    trainer.train()
    raise SystemExit(f"TRL {w.trl} ended before {rec.total} steps")


def run_trl_ppo(w: Workload, args: argparse.Namespace, rec: Recorder, tmp: Path) -> None:
    """TRL 1.12's PPOTrainer (`trl.experimental.ppo`, run from bench/.venv-trl112), set as
    posttrain's side of the row (posttrain_argv): the prompts of --prompts in their order, one
    completion each, a reference copy, the value model and the reward model from --reward-model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    path, rm = model_dir(args.model), args.reward_model
    # the reward model's tokenizer: the policy's, with the pad token that make_reward_model chose
    # (TRL's PPO finds padding by id; prompts are left-padded, as its examples do)
    tok = AutoTokenizer.from_pretrained(rm)
    tok.padding_side = "left"
    prompts = json.loads(Path(args.prompts).read_text())
    data = Dataset.from_list(
        [{"input_ids": tok(p, add_special_tokens=False)["input_ids"]} for p in prompts]
    )
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(
        rm, num_labels=1, dtype=torch.float32
    )
    reward = AutoModelForSequenceClassification.from_pretrained(
        rm, num_labels=1, dtype=torch.float32
    )
    rec.count_tokens(policy)
    rec.count_tokens(getattr(value, value.base_model_prefix))  # the critic's trunk

    loader = ppo_module.DataLoader

    def in_order(*a: Any, **k: Any) -> Any:  # PPOTrainer hard-codes shuffle=True
        k["shuffle"] = False
        return loader(*a, **k)

    ppo_module.DataLoader = in_order
    sample = ppo_module.batch_generation

    def timed(model: Any, queries: Any, *a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = sample(model, queries, *a, **k)
        comp = out[0][:, queries.shape[1] :]
        is_eos = comp == tok.eos_token_id  # tokens up to and including the first EOS
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
        rec.generated(int(first.sum()), time.perf_counter() - t0)
        return out

    ppo_module.batch_generation = timed
    cfg = PPOConfig(
        **trl_common(w, args, tmp), total_episodes=len(prompts), num_ppo_epochs=1,
        num_mini_batches=1, local_rollout_forward_batch_size=w.batch,
        response_length=w.new_tokens, stop_token="eos", temperature=1.0, kl_coef=w.trl_kl,
        kl_estimator="k1", whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, missing_eos_penalty=None, num_sample_generations=0,
    )  # fmt: skip
    trainer = PPOTrainer(
        args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
        value_model=value, train_dataset=data, eval_dataset=data,
        callbacks=[step_end_callback(rec)],
    )  # fmt: skip
    rec.extra["trl_optim"] = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    trainer.train()
    raise SystemExit(f"TRL {w.trl} ended before {rec.total} steps")


def run_generate_trl(
    w: Workload, args: argparse.Namespace, rec: Recorder, tok: Any, path: str
) -> None:
    """What TRL's trainers do to sample without vLLM: left-padded batch, model.generate, KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok.padding_side = "left"
    gcfg = GenerationConfig(max_new_tokens=w.new_tokens, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)  # fmt: skip
    per = w.batch // w.group
    prompts = prompt_messages(rec.total * per)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    with torch.no_grad(), autocast:
        for s in range(rec.total):
            texts = [
                tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                for p in prompts[s * per : (s + 1) * per]
                for _ in range(w.group)
            ]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.perf_counter()
            out = model.generate(**enc, generation_config=gcfg)
            comp = out[:, enc["input_ids"].shape[1] :]
            # tokens up to and including the first EOS, as TRL counts them
            is_eos = comp == tok.eos_token_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, comp.shape[1])
            rec.generated(int(first.sum()), time.perf_counter() - t0)
            rec.step_end()


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    w = WORKLOADS[args.workload]
    rec = Recorder(args, args.child, w)
    # under the parent's temporary directory: the child ends with os._exit, which skips cleanup
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-child-"))
    tmp.mkdir(parents=True, exist_ok=True)
    if args.child == "posttrain":
        run_posttrain(w, args, rec, tmp)
    else:
        run_trl(w, args, rec, tmp)
    raise SystemExit("the child finished without recording its steps")


# ---------------------------------------------------------------------------------------------
# The parent: alternate the sides, collect, print the table


def cpu_busy_seconds() -> float:
    """CPU seconds spent by every process on the machine so far (/proc/stat, all cores)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_load(seconds: float = 2.0) -> float:
    """Cores busy over `seconds` while this process sleeps: the other processes' load."""
    import resource

    own0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    b0 = cpu_busy_seconds()
    time.sleep(seconds)
    own = sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - own0
    return max(0.0, (cpu_busy_seconds() - b0 - own) / seconds)


def wait_for_quiet(args: argparse.Namespace) -> float:
    """Wait (up to --quiet-wait s) until other processes use under --quiet-load cores; the last
    reading."""
    deadline = time.monotonic() + args.quiet_wait
    load = others_load()
    while load >= args.quiet_load and time.monotonic() < deadline:
        print(f"  waiting for a quiet machine: other processes use {load:.2f} cores",
              file=sys.stderr, flush=True)  # fmt: skip
        time.sleep(10)
        load = others_load()
    return load


def trl_python(w: Workload, bench_dir: Path | None = None) -> Path | None:
    """The Python that runs w's TRL side: the harness's own, or the one of its TRL_ENVS virtual
    environment under bench_dir (default: bench/; None when that environment is not built)."""
    if not w.trl_env:
        return Path(sys.executable)
    py = (bench_dir or HERE) / TRL_ENVS[w.trl_env][0] / "bin" / "python"
    return py if py.is_file() else None


def missing_trl_envs(
    names: list[str], sides: list[str], bench_dir: Path | None = None
) -> str | None:
    """Why these rows cannot run their TRL side (a TRL_ENVS environment is not built), or None."""
    if "trl" not in sides:
        return None
    bench_dir = bench_dir or HERE
    missing: dict[str, list[str]] = {}
    for name in names:
        w = WORKLOADS[name]
        if w.trl_env and trl_python(w, bench_dir) is None:
            missing.setdefault(w.trl_env, []).append(name)
    lines = []
    for env, rows in missing.items():
        venv, version, make = TRL_ENVS[env]
        lines.append(
            f"{', '.join(rows)}: the TRL side runs TRL {version} from {bench_dir / venv}, which "
            f"is missing. Build it with `{make}`, or leave these rows out, or run --sides posttrain."
        )
    return "\n".join(lines) or None


def ppo_pad_token(tok: Any, prompts: list[str]) -> str:
    """A pad token for TRL 1.12's PPOTrainer, which tells padding by token id (`ids != pad`) in
    the prompts and the completions: not the EOS, whose mask would hide each completion's end,
    and no token of the prompts (SmolLM2 pads with <|im_end|>, which ends every chat turn)."""
    used = {i for p in prompts for i in tok(p, add_special_tokens=False)["input_ids"]}
    for i in [tok.pad_token_id, 0, *tok.all_special_ids]:
        if i is not None and i != tok.eos_token_id and i not in used:
            return tok.convert_ids_to_tokens(i)
    raise ValueError("no token id left to pad with: every special token occurs in the prompts")


def online_prompts(tok: Any, n: int, plain: bool) -> list[str]:
    """The first n prompts of the online rows as text: the question alone (plain) or the
    chat-templated system + user turns with the assistant's turn open."""
    if plain:
        return plain_prompts(n)
    return [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in prompt_messages(n)
    ]


def make_reward_model(model_path: str, out: Path, prompts: list[str]) -> Path:
    """The ppo rows' reward model, saved once to out for both sides: the policy's weights with a
    scalar head (AutoModelForSequenceClassification, num_labels 1, seeded), and its tokenizer
    padding with `ppo_pad_token`. TRL's side also builds its value model from it."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.pad_token = ppo_pad_token(tok, prompts)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def child_inputs(w: Workload, args: argparse.Namespace, tmp: Path) -> list[str]:
    """What the parent prepares for a child: for ppo, the shared reward model and the prompt texts
    (so that the TRL 1.12 child, which has no posttrain, reads the same prompts)."""
    if w.kind != "ppo":
        return []
    from transformers import AutoTokenizer

    path = model_dir(args.model)
    n = max((args.warmup + args.steps) * w.batch, 16)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = online_prompts(tok, n, w.plain)
    reward = make_reward_model(path, tmp / "ppo-reward-model",
                               online_prompts(tok, n, False) + plain_prompts(n))  # fmt: skip
    file = tmp / f"{w.name}-prompts.json"
    file.write_text(json.dumps(prompts))
    return ["--reward-model", str(reward), "--prompts", str(file)]


def run_child(
    side: str, w: Workload, args: argparse.Namespace, tmp: Path, rnd: int = 0
) -> dict[str, Any]:
    result = tmp / f"{w.name}-{side}-{time.monotonic_ns()}.json"
    log = result.with_suffix(".log")
    python = trl_python(w) if side == "trl" else Path(sys.executable)
    if python is None:
        return {"side": side, "workload": w.name, "round": rnd, "error": "no venv"}
    # the model directory resolved here: a TRL_ENVS child cannot import posttrain to find it
    cmd = [str(python), str(Path(__file__).resolve()), "--child", side, "--workload", w.name,
           "--model", model_dir(args.model), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--dtype", args.dtype, "--result", str(result),
           "--workdir", str(result.with_suffix("")), "--max-length", str(args.max_length),
           f"--posttrain-args={args.posttrain_args}", *child_inputs(w, args, tmp)]  # fmt: skip
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "DISABLE_MLFLOW_INTEGRATION": "TRUE",
        "WANDB_DISABLED": "true",
        **(SAME_ALLOCATOR if args.settings == "same" else {}),
    }
    import resource

    quiet = wait_for_quiet(args)
    kids0 = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    busy0 = cpu_busy_seconds()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.timeout)  # fmt: skip
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    child_cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - kids0
    others = max(0.0, (cpu_busy_seconds() - busy0 - child_cpu) / wall)
    if not result.is_file():
        tail = log.read_text()[-3000:]
        print(f"  {w.name} / {side}: failed (rc={rc})\n{tail}", file=sys.stderr, flush=True)
        return {"side": side, "workload": w.name, "round": rnd, "error": f"rc={rc}"}
    res = json.loads(result.read_text())
    res.update(round=rnd, others_load=others, quiet_before=quiet)
    print(
        f"  {w.name:14s} {side:9s} round {rnd + 1}: median "
        f"{statistics.median(res['step_seconds']):.3f} s/step, peak RSS "
        f"{res['peak_rss_mb']:.0f} MB, others' load {others:.2f} cores ({wall:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return res


def machine_info(args: argparse.Namespace) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import transformers
        import trl

        versions = f"transformers {transformers.__version__}, TRL {trl.__version__}"
    except ImportError:
        versions = "TRL not installed"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, load {load:.1f} at start; Python "
        f"{platform.python_version()}, torch {torch.__version__}, {versions}; "
        f"{args.threads} threads, {args.dtype}"
        f"{' autocast' if args.dtype == 'bfloat16' else ''}, model {args.model}; "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.rounds} round(s); "
        f"process settings: {args.settings}"
        + (
            f" ({' '.join(f'{k}={v}' for k, v in SAME_ALLOCATOR.items())})"
            if args.settings == "same"
            else ""
        )
        + (f"; posttrain with {args.posttrain_args}" if args.posttrain_args else "")
    )


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _fmt(x: float | None, spec: str) -> str:
    return format(x, spec) if x is not None else "-"


def summarize(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(workload, side) -> median s/step (all rounds), per-round medians, gen tok/s, tokens per
    step (generated; padded and real through training forwards), max peak RSS and others' load,
    the first step's metrics."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        key = (r["workload"], r["side"])
        if "error" in r:
            out.setdefault(key, {"error": r["error"]})
            continue
        cur = out.get(key, {})
        if "steps" not in cur:  # the first result of this side that ran (a failed round's goes)
            cur = out[key] = {"steps": [], "tok": 0, "sec": 0.0, "rss": 0.0, "rounds": {},
                              "load": 0.0, "padded": [], "real": [],
                              "first": r.get("first_step", {}),
                              "version": r.get("trl_version")}  # fmt: skip
        cur["steps"] += r["step_seconds"]
        cur["rounds"][r.get("round", 0)] = statistics.median(r["step_seconds"])
        cur["tok"] += r["gen_tokens"]
        cur["sec"] += r["gen_seconds"]
        cur["rss"] = max(cur["rss"], r["peak_rss_mb"])
        cur["load"] = max(cur["load"], r.get("others_load", 0.0))
        timed = r.get("step_tokens", [])[-len(r["step_seconds"]) :]
        cur["padded"] += [t[0] for t in timed]
        cur["real"] += [t[1] for t in timed]
    for v in out.values():
        if "steps" in v:
            v["s_step"] = statistics.median(v["steps"])
            v["tok_s"] = v["tok"] / v["sec"] if v["sec"] else None
            v["tok_step"] = v["tok"] / len(v["steps"]) if v["tok"] else None
            v["padded_step"] = statistics.mean(v["padded"]) if v["padded"] else None
            v["real_step"] = statistics.mean(v["real"]) if v["real"] else None
    return out


def round_ratios(p: dict[str, Any], t: dict[str, Any]) -> list[float]:
    """TRL s/step over posttrain s/step in each round that has both sides."""
    rounds = sorted(set(p.get("rounds", {})) & set(t.get("rounds", {})))
    return [t["rounds"][r] / p["rounds"][r] for r in rounds]


def agreement(kind: str, p: dict[str, Any], t: dict[str, Any]) -> tuple[bool, str]:
    """Equal work for SFT/DPO: the first step's shared metrics agree to AGREE_RTOL."""
    if kind not in ("sft", "dpo"):
        return True, "n/a (sampled)"
    a, b = p.get("first", {}), t.get("first", {})
    keys = [k for k in AGREE_KEYS if k in a and k in b]
    if not keys:
        return False, "no shared first-step metric"
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), abs(b[k]), 1e-12) for k in keys)
    text = ", ".join(f"{k} {a[k]:.6g}/{b[k]:.6g}" for k in keys)
    return worst <= AGREE_RTOL, f"{text} (rel {worst:.1e})"


def row_limit(
    w: Workload, sides: list[dict[str, Any]], peaks: Peaks, counts: ModelCounts, dtype: str
) -> float | None:
    """The fewest seconds a step of this row can take on this machine (roofline):

    - training forwards: `train_flops` over the real tokens at the matmul peak (LoRA: 4 instead
      of 6 FLOPs per weight and token, no weight gradient for the frozen weights); the fewer real
      tokens of the two sides, so work one side saves (a shared prompt) counts as saved;
    - online rows add sampling: the prompts' prefill (`forward_flops`) and one decode step per new
      token at `decode_step_seconds` (max of bytes / bandwidth and FLOPs / peak) for the whole
      batch, plus one scoring forward for the reference's log-probs when the KL is on;
    - ppo: the policy and the value model each train on every sequence (the real tokens count
      both, half each; the value model without the LM head: its head is a scalar), and the reward
      model (a scalar head too) adds one scoring forward.
    Attention is counted over the causal half of each row's length (padded width / rows)."""
    have = [v for v in sides if v.get("real_step")]
    if not have:
        return None
    real = min(v["real_step"] for v in have)
    rows = w.batch * (2 if w.kind in ("dpo", "ppo") else 1)
    ctx = causal_context(int(min(v["padded_step"] for v in have) / rows))
    seq = real / 2 if w.kind == "ppo" else real  # the tokens of the sampled sequences
    flops = train_flops(counts, int(seq), ctx)
    if w.kind == "ppo":  # the value model trains on the same sequences
        flops += train_flops(counts.headless(), int(seq), ctx)
    seconds = train_limit_seconds(peaks, flops, dtype)
    if w.lora:
        seconds *= 2 / 3
    gen = [v["tok_step"] for v in have if v.get("tok_step")]
    if w.kind in ("sft", "dpo") or not gen:
        return seconds
    new = statistics.mean(gen)  # sampled tokens per step
    seconds += rollout_seconds(
        peaks, counts, prompt_tokens=int(max(seq - new, 0)), prompt_attn_context=ctx,
        new_tokens=new, batch=w.batch, context_len=seq / w.batch, dtype=dtype,
    )[0]  # fmt: skip
    scoring = forward_flops(counts, int(seq), ctx) if w.kl else 0.0  # the reference
    if w.kind == "ppo":  # the reward model
        scoring += forward_flops(counts.headless(), int(seq), ctx)
    return seconds + train_limit_seconds(peaks, scoring, dtype)


def table(
    summary: dict[tuple[str, str], dict[str, Any]],
    names: list[str],
    info: str,
    max_len: int,
    limits: tuple[Peaks, ModelCounts, str] | None = None,
) -> str:
    lines = [
        f"machine: {info}",
        f"both sides: {COMMON}",
        "",
        "| workload | TRL side | s/step posttrain | s/step TRL | speed-up, median of rounds "
        "[min-max] | rounds | first step posttrain/TRL | train tokens/step padded/real posttrain "
        "| train tokens/step padded/real TRL | gen tokens/step posttrain/TRL "
        "| gen tok/s posttrain/TRL | peak RSS MB posttrain/TRL | others' load (cores, max) "
        "| limit s/step | % of limit posttrain/TRL | hyper-parameters |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in names:
        w = WORKLOADS[name]
        p = summary.get((name, "posttrain"), {})
        t = summary.get((name, "trl"), {})
        ps, ts = p.get("s_step"), t.get("s_step")
        pe = p.get("error") and f"failed ({p['error']})"
        te = t.get("error") and f"failed ({t['error']})"
        ratios = round_ratios(p, t)
        lim = row_limit(w, [p, t], *limits) if limits else None

        def pct(sec: float | None, lim: float | None = lim) -> str:
            return pct_of_limit(lim, sec) if lim and sec else "-"

        ok, check = agreement(w.kind, p, t) if ps and ts else (True, "-")
        if not ratios:
            speed = "-"
        elif not ok:
            speed = "refused: unequal work"
        else:
            speed = f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
        trl_side = f"{w.trl} (TRL {t['version']})" if t.get("version") else w.trl
        lines.append(
            f"| {name} | {trl_side} | {pe or _fmt(ps, '.3f')} | {te or _fmt(ts, '.3f')} | {speed} "
            f"| {len(ratios)} | {check} "
            f"| {_fmt(p.get('padded_step'), '.0f')}/{_fmt(p.get('real_step'), '.0f')} "
            f"| {_fmt(t.get('padded_step'), '.0f')}/{_fmt(t.get('real_step'), '.0f')} "
            f"| {_fmt(p.get('tok_step'), '.0f')}/{_fmt(t.get('tok_step'), '.0f')} "
            f"| {_fmt(p.get('tok_s'), '.1f')}/{_fmt(t.get('tok_s'), '.1f')} "
            f"| {_fmt(p.get('rss'), '.0f')}/{_fmt(t.get('rss'), '.0f')} "
            f"| {max(p.get('load', 0.0), t.get('load', 0.0)):.2f} "
            f"| {_fmt(lim, '.3f')} | {pct(ps)}/{pct(ts)} "
            f"| {w.notes.format(max_len=max_len)} |"
        )
    lines += [
        "",
        "speed-up > 1: posttrain takes less time per optimizer step (TRL s / posttrain s, one "
        "ratio per round, each the ratio of the two sides' median step in that round). A step is "
        "timed end to end (generation, reward, reference, forward, backward, optimizer, log "
        "line). Train tokens: the tokens of every forward with gradients on, per timed step "
        "(padded = the batch's width x rows; real = attention-mask ones). Limit: the fewest "
        "seconds the row's work takes at the measured matmul peak and read bandwidth "
        "(`row_limit`); % of limit = limit / the side's median s/step.",
    ]
    if limits:
        peaks = limits[0]
        lines.insert(1, f"peaks ({peaks.threads} threads): fp32 {peaks.fp32_gflops:.0f} GFLOP/s, "
                     f"bf16 {peaks.bf16_gflops:.0f} GFLOP/s, read {peaks.read_gbs:.1f} GB/s "
                     f"({peaks.cpu})")  # fmt: skip
    return "\n".join(lines)


def parent(args: argparse.Namespace) -> int:
    sides = args.sides.split(",")
    names = args.workloads.split(",")
    missing = missing_trl_envs(names, sides)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    if "trl" in sides and any(not WORKLOADS[n].trl_env for n in names):
        try:
            import trl  # noqa: F401
        except ImportError:
            print(
                "TRL is not installed: pip install -e '.[bench]' (or pip install --no-deps trl), "
                "or run --sides posttrain",
                file=sys.stderr,
            )
            return 2
    info = machine_info(args)
    results: list[dict[str, Any]] = []
    limits = None
    if args.limits:
        from dataclasses import asdict

        from transformers import AutoConfig

        wait_for_quiet(args)
        peaks = measure_peaks(args.threads)
        counts = model_counts(AutoConfig.from_pretrained(model_dir(args.model)))
        limits = (peaks, counts, args.dtype)
        print(f"peaks: fp32 {peaks.fp32_gflops:.0f} GFLOP/s, bf16 {peaks.bf16_gflops:.0f} GFLOP/s, "
              f"read {peaks.read_gbs:.1f} GB/s ({peaks.cpu}, {peaks.threads} threads)",
              file=sys.stderr, flush=True)  # fmt: skip

    def save() -> None:  # after every child, so an interrupted run keeps what it measured
        if args.out:
            saved = {"machine": info, "workloads": names, "max_length": args.max_length,
                     "results": results, "dtype": args.dtype}  # fmt: skip
            if limits:
                saved.update(peaks=asdict(limits[0]), counts=asdict(limits[1]))
            Path(args.out).write_text(json.dumps(saved, indent=1))

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        for r in range(args.rounds):
            for i, name in enumerate(names):
                order = sides if (i + r) % 2 == 0 else sides[::-1]
                for side in order:
                    results.append(run_child(side, WORKLOADS[name], args, Path(tmp), r))
                    save()
    print(table(summarize(results), names, info, args.max_length, limits))
    return 0 if all("error" not in r for r in results) else 1


def report(path: str) -> int:
    """Print the table of a results file written by --out (also of an interrupted run)."""
    saved = json.loads(Path(path).read_text())
    names = [n for n in saved["workloads"] if any(r["workload"] == n for r in saved["results"])]
    limits = None
    if "peaks" in saved:
        limits = (Peaks(**saved["peaks"]), ModelCounts(**saved["counts"]), saved["dtype"])
    print(table(summarize(saved["results"]), names, saved["machine"], saved["max_length"], limits))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    if args.child:
        child(args)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
