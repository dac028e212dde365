"""Per-phase seconds of an online-RL step of a bench workload: generation, reference, scoring,
training forward, backward, optimizer.

    python bench/profile_step.py grpo --steps 3                 # embedded default, 1 thread, fp32
    python bench/profile_step.py ppo_plain --steps 4 --threads 2  # the harness's ppo_plain row
    python bench/profile_step.py ppo --steps 3 --dtype bfloat16
    python bench/profile_step.py grpo --threads 2 --run.onednn=false --run.reuse_memory=false

Runs posttrain's command with the arguments, prompts and prompt order bench/trl_compare.py gives
its posttrain child (`posttrain_argv`, `same_order`, `plain_stream`; for ppo the reward model it
builds), in this process, with timers wrapped around the functions each phase runs, and prints every step's
phases (indented ones are inside the phase above them) with the system seconds and page faults
each spent. Other `--section.key=value` arguments go to the command. Step 1 includes warm-up costs (the first
optimizer step allocates AdamW's state). For comparing phases within one run: on a shared CPU the
absolute times move with the load.
"""

from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    import torch
    import trl_compare as tc
    from workloads import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workload", choices=[n for n, w in WORKLOADS.items() if w.kind not in ("sft", "dpo", "generate")])  # fmt: skip
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--model", default="default")
    a, overrides = ap.parse_known_args(argv)  # the rest goes to the command: --run.onednn=false
    torch.set_num_threads(a.threads)
    args = tc.parse_args(["--steps", str(max(a.steps - 1, 1)), "--warmup", "1", "--threads",
                          str(a.threads), "--model", a.model, "--dtype", a.dtype])  # fmt: skip
    args.steps, args.warmup = a.steps, 0  # posttrain_argv runs warmup + steps

    import accelerate

    import posttrain.algos.grpo as grpo
    import posttrain.algos.ppo as ppo
    import posttrain.algos.reinforce as reinforce
    import posttrain.decoder as decoder
    import posttrain.online as online
    import posttrain.online_run as online_run
    import posttrain.rollout as rollout
    import posttrain.value_head as value_head
    from posttrain.cli import main as cli_main
    from posttrain.models import load_tokenizer
    from posttrain.runs import Run

    phases: dict[int, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))  # fmt: skip
    faults: dict[int, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))  # fmt: skip
    sys_s: dict[int, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))  # fmt: skip
    state = {"step": 1, "last": None}

    def wrap(owner: Any, name: str, label: str) -> None:
        f = getattr(owner, name)

        def timed(*x: Any, **k: Any) -> Any:
            t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            try:
                return f(*x, **k)
            finally:
                r2 = resource.getrusage(resource.RUSAGE_SELF)
                phases[state["step"]][label] += time.perf_counter() - t
                faults[state["step"]][label] += r2.ru_minflt - r.ru_minflt
                sys_s[state["step"]][label] += r2.ru_stime - r.ru_stime

        setattr(owner, name, timed)

    # what each phase runs (indented: inside the phase above)
    wrap(online_run.OnlineRun, "sample", "sampling + reward")
    wrap(online_run, "generate", "  generation (whole call)")
    wrap(decoder.LeanDecoder, "build", "    lean decoder build (weights reordered)")
    wrap(rollout, "_prefill", "    prefill")
    wrap(decoder.LeanDecoder, "step", "    decode steps")
    wrap(rollout, "_draw", "    draw")
    wrap(online.Reference, "logits", "reference forward")
    for m in (grpo, reinforce, ppo):
        if hasattr(m, "score_rollout"):
            wrap(m, "score_rollout", "scoring pass (reference, policy no-grad where needed)")
        for n in ("completion_logits", "completion_logits_shared"):
            if hasattr(m, n):
                wrap(m, n, "policy forward (training)")
    for n in ("exact_kl", "entropy_from_logits"):
        wrap(online, n, "  exact KL / entropy over (B, T, V)")
    wrap(value_head.ActorCritic, "forward", "policy+value forward (ppo, one backward)")
    wrap(value_head.ActorCritic, "critic_values", "value model forward (ppo)")
    wrap(value_head.ActorCritic, "policy_logits", "policy forward (ppo)")
    wrap(accelerate.Accelerator, "backward", "backward")
    # imported by name where they run: wrap them at their source and where they were imported
    import posttrain.train as train

    for owner in (train, online_run):
        wrap(owner, "clip_and_step", "optimizer (clip + AdamW)")
    orig_log = Run.log

    def log(self: Run, step: int, metrics: dict[str, Any], echo: bool = True) -> dict[str, Any]:
        now = time.perf_counter()
        if step > 0:
            if state["last"] is not None:
                phases[step]["STEP (end to end)"] = now - state["last"]
            state["last"], state["step"] = now, step + 1
        return orig_log(self, step, metrics, echo=False)

    Run.log = log  # type: ignore[method-assign]
    w = WORKLOADS[a.workload]
    tc.same_order()  # the prompts and their order of the harness's posttrain child
    if w.plain:
        tc.plain_stream()
    tok = load_tokenizer(tc.model_dir(a.model))
    with tempfile.TemporaryDirectory() as tmp:
        extra = tc.child_inputs(w, args, Path(tmp))  # ppo: the reward model the harness builds
        if extra:
            args.reward_model = extra[extra.index("--reward-model") + 1]
        cli_main(tc.posttrain_argv(w, args, tok, Path(tmp)) + overrides)
    for step in sorted(phases):
        print(f"step {step}")
        for k, v in phases[step].items():
            print(
                f"  {k:48s} {v:7.3f} s  {sys_s[step][k]:6.3f} s sys  {int(faults[step][k]):8d} page faults"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
