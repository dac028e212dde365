"""Generation throughput: sequential (one prompt at a time) vs batched, on the embedded default.

    python bench/generation.py                      # batch 1, 8, 32; 64 new tokens; 32 prompts
    python bench/generation.py --threads 2 --prompts 32 --new-tokens 64 --batches 1,8,32

Prints a markdown table of generated tokens per second and the ratio to sequential. Both sides use
posttrain.rollout (the same sampler), so the ratio measures batching with left padding and the KV
cache, nothing else. Run it on a quiet machine: a busy core skews the numbers.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

QUESTIONS = [
    "Explain why the sky is blue.",
    "Write a short poem about autumn.",
    "What is the capital of Japan?",
    "Give me three tips for learning to cook.",
    "How do airplanes stay in the air?",
    "Describe a cat to someone who has never seen one.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet.",
    "Why do we need sleep?",
    "Name some uses of a paperclip.",
    "How does a refrigerator work?",
    "What makes a good friend?",
    "Convert 5 kilometers to miles.",
    "Tell me a fun fact about octopuses.",
    "What is photosynthesis?",
    "How do I make a cup of tea?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()

    import torch

    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype=args.dtype)
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    cfg = GenerationConfig(chat=True, temperature=0.7, max_new_tokens=args.new_tokens)
    generate(model, tok, prompts[:2], cfg, batch_size=2)  # warm-up

    rows = []
    base = None
    for bs in [int(b) for b in args.batches.split(",")]:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        roll = generate(model, tok, prompts, cfg, batch_size=bs)
        secs = time.perf_counter() - t0
        tps = roll.num_tokens / secs
        if bs == 1:
            base = tps
        rows.append((bs, roll.num_tokens, secs, tps))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, model {args.model}"
    )
    print(f"{args.prompts} chat prompts, {args.new_tokens} new tokens max, temperature 0.7\n")
    print("| mode | batch | tokens | seconds | tokens/s | x sequential |")
    print("|---|---:|---:|---:|---:|---:|")
    for bs, n, secs, tps in rows:
        mode = "sequential" if bs == 1 else "batched"
        ratio = f"{tps / base:.1f}" if base else "-"
        print(f"| {mode} | {bs} | {n} | {secs:.1f} | {tps:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
