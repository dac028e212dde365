"""Where posttrain's sampling spends its time: one rollout under torch.profiler.

    python bench/profile_generation.py                       # 2 prompts x 4, 32 new tokens, 2 threads
    python bench/profile_generation.py --threads 1 --prompts 8 --n 1

Samples the bench's GRPO rollout (`workloads.prompt_messages`: the unit-conversion chat prompts
bench/trl_compare.py trains on; temperature 1, no top-k/top-p, per-row seeds as the online
algorithms sample) on the embedded default model: three timed rollouts as warm-up, then one
under torch.profiler, whose operators are printed by self CPU time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rows", type=int, default=25, help="operators to print")
    ap.add_argument("--onednn", choices=["auto", "true", "false"], default="auto",
                    help="fp32 linear layers' kernel, as posttrain's commands choose it (run.onednn)")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.profiler import ProfilerActivity, profile
    from workloads import prompt_messages

    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    model, tok = load_model(
        args.model, onednn={"true": True, "false": False}.get(args.onednn, "auto")
    )
    prompts = prompt_messages(args.prompts)
    cfg = GenerationConfig(max_new_tokens=args.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                           n=args.n, chat=True, stop=[])  # fmt: skip
    seeds = list(range(len(prompts)))
    for _ in range(3):
        t0 = time.perf_counter()
        out = generate(model, tok, prompts, cfg, seeds=seeds)
        dt = time.perf_counter() - t0
        n_tok = int(out.completion_mask.sum())
        print(f"rollout {dt:.2f} s, {n_tok} tokens, {n_tok / dt:.1f} tokens/s", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(model, tok, prompts, cfg, seeds=seeds)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
