"""Generation throughput: sequential (one prompt at a time) vs batched, on the embedded default.

    python bench/generation.py                      # batch 1, 8, 32; 64 new tokens; 32 prompts
    python bench/generation.py --threads 2 --prompts 32 --new-tokens 64 --batches 1,8,32

Prints a markdown table of generated tokens per second and the ratio to sequential. Both sides use
posttrain.rollout (the same sampler), so the ratio measures batching with left padding and the KV
cache, nothing else. Run it on a quiet machine: a busy core skews the numbers. `--batching
continuous,micro` adds rows that decode micro-batch after micro-batch (`gen.continuous_batching`
false) next to the default continuous batch, where a finished row's slot takes the next prompt:
they differ where completions end at different lengths (`--new-tokens 256`: most end at EOS).

A second table ("with tools") decodes unit-conversion questions after two worked examples that
call the calculator (`<calc>...</calc>`), at the largest batch, once without tools and once with
the calculator running inside generation: tokens/s counts every completion token (a tool's result
tokens cost a decoding step each, like sampled ones), so the ratio is the cost of running tools in
the loop (finding calls, running them, tokenizing results). Skip it with --tool-rows=false.

Limits (bench/limits.py; skip with --no-limits): first the matmul peaks and the memory read
bandwidth are measured at --threads threads (a few seconds), then each batch row shows the most
tokens/s the machine allows for the same work and the row's "% of limit". The limit's time is the
prompts' prefill at the matmul peak (a start common to all prompts counted once, each distinct
prompt's other tokens once: `prefill_tokens`) plus (completion tokens / batch) decode steps, each at the
roofline max(bytes / bandwidth, FLOPs / peak) for `batch` rows whose cache holds the row's mean
prompt length + half its mean completion length (real tokens, padding not counted; every step
assumed to carry a full batch). "bound" says which side of the roofline the decode step is on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limits import (  # noqa: E402
    ModelCounts,
    Peaks,
    causal_context,
    measure_peaks,
    model_counts,
    pct_of_limit,
    rollout_seconds,
)

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
    ap.add_argument("--tool-rows", default="true", choices=["true", "false"])
    ap.add_argument(
        "--sample-dtypes",
        default="model",
        help="gen.sample_dtype of each batched row set: model (the model's weights), bfloat16 "
        "(a bf16 copy samples; its limit is the bf16 one); e.g. model,bfloat16",
    )
    ap.add_argument(
        "--lean",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="gen.lean_decoder: posttrain's lean decode step (default); --no-lean: the model's "
        "forward",
    )
    ap.add_argument(
        "--batching",
        default="continuous",
        help="gen.continuous_batching of each batched row set: continuous (a finished row's "
        "slot takes the next prompt), micro (micro-batch after micro-batch); e.g. "
        "continuous,micro",
    )
    ap.add_argument(
        "--onednn",
        choices=["auto", "true", "false"],
        default="auto",
        help="fp32 linear layers' kernel, as posttrain's commands choose it (run.onednn): auto "
        "(oneDNN where it measures faster, the default), true (oneDNN), false (torch's)",
    )
    ap.add_argument(
        "--limits",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the machine's peaks and print each row's limit and %% of limit",
    )
    args = ap.parse_args()

    import torch

    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    peaks = measure_peaks(args.threads) if args.limits else None
    if peaks is not None:
        print(
            f"limits: {peaks.cpu}, {peaks.threads} threads: matmul {peaks.fp32_gflops:.0f} GFLOP/s "
            f"fp32, {peaks.bf16_gflops:.0f} GFLOP/s bf16; memory read {peaks.read_gbs:.1f} GB/s"
        )
    torch.set_num_threads(args.threads)
    model, tok = load_model(
        args.model, dtype=args.dtype, onednn={"true": True, "false": False}.get(args.onednn, "auto")
    )
    prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.prompts)]
    cfg = GenerationConfig(chat=True, temperature=0.7, max_new_tokens=args.new_tokens,
                           lean_decoder=args.lean)  # fmt: skip
    generate(model, tok, prompts[:2], cfg, batch_size=2)  # warm-up

    rows = []
    base = None
    fp32_tps: dict[tuple[int, str], float] = {}
    for batching in args.batching.split(","):
        if batching not in ("continuous", "micro"):
            raise SystemExit(f"--batching takes continuous and/or micro, not {batching!r}")
        for sample_dtype in args.sample_dtypes.split(","):
            c = dataclasses.replace(
                cfg, sample_dtype=sample_dtype, continuous_batching=batching == "continuous"
            )
            for bs in [int(b) for b in args.batches.split(",")]:
                if bs == 1 and (sample_dtype != "model" or base is not None):
                    continue  # the sequential base runs once
                torch.manual_seed(0)
                t0 = time.perf_counter()
                roll = generate(model, tok, prompts, c, batch_size=bs)
                secs = time.perf_counter() - t0
                tps = roll.num_tokens / secs
                if bs == 1:
                    base = tps
                if sample_dtype == "model":
                    fp32_tps[bs, batching] = tps
                rows.append((bs, roll.num_tokens, secs, tps, roll, sample_dtype, batching))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, model {args.model}"
    )
    print(f"{args.prompts} chat prompts, {args.new_tokens} new tokens max, temperature 0.7, "
          f"{'lean decoder' if args.lean else 'the model forward'}\n")  # fmt: skip
    dtype = str(model.dtype).removeprefix("torch.")
    counts = model_counts(model.config)
    if peaks is not None and dtype not in ("float32", "bfloat16"):
        print(f"(no limits: peaks are measured for float32 and bfloat16, not {dtype})")
        peaks = None
    head = "| mode | sampler | batch | tokens | seconds | tokens/s | x sequential | x model |"
    rule = "|---|---|---:|---:|---:|---:|---:|---:|"
    if peaks is not None:
        head += " limit tokens/s | % of limit | bound |"
        rule += "---:|---:|---|"
    print(head)
    print(rule)
    for bs, n, secs, tps, roll, sample_dtype, batching in rows:
        mode = "sequential" if bs == 1 else f"batched, {batching}"
        ratio = f"{tps / base:.1f}" if base else "-"
        sampler = dtype if sample_dtype == "model" else sample_dtype
        fp32 = fp32_tps.get((bs, batching))
        vs = f"{tps / fp32:.2f}" if sample_dtype != "model" and fp32 else "-"
        line = f"| {mode} | {sampler} | {bs} | {n} | {secs:.1f} | {tps:.1f} | {ratio} | {vs} |"
        if peaks is not None:
            limit, bound = row_limit(peaks, counts, roll, bs, sampler)
            line += f" {limit:.1f} | {pct_of_limit(tps, limit)} | {bound} |"
        print(line)
    if args.tool_rows == "true":
        tool_rows(
            model, tok, args.prompts, args.new_tokens, max(int(b) for b in args.batches.split(","))
        )


def prefill_tokens(roll) -> int:
    """Prompt tokens a prefill of the rollout's prompts must run at the least: a start common to
    all of them (the chat template's system prompt) once, and each distinct prompt's other tokens
    once (its n samples share them). Counting every row's whole prompt would credit the sampler
    with work it skips."""
    from posttrain.forwards import common_prefix

    first: dict[int, int] = {}  # prompt -> its first row
    for row, prompt in enumerate(roll.prompt_index.tolist()):
        first.setdefault(prompt, row)
    rows = list(first.values())
    ids, mask = roll.prompt_ids[rows], roll.prompt_mask[rows]  # one row per distinct prompt
    c = common_prefix(ids, mask) if len(rows) > 1 else 0
    return c + int((mask.sum(1) - c).sum())


def row_limit(peaks: Peaks, counts: ModelCounts, roll, batch: int, dtype: str) -> tuple[float, str]:
    """(tokens/s limit, "memory" or "compute") for one row: its sampled tokens over the fewest
    seconds its prefill (`prefill_tokens`) and decode steps can take (see the module docstring)."""
    n = len(roll)
    prompt_tokens = prefill_tokens(roll)
    new_tokens = int(roll.completion_mask.sum())
    seconds, bound = rollout_seconds(
        peaks, counts, prompt_tokens=prompt_tokens,
        prompt_attn_context=causal_context(round(prompt_tokens / n)), new_tokens=new_tokens,
        batch=batch, context_len=prompt_tokens / n + new_tokens / n / 2, dtype=dtype,
    )  # fmt: skip
    return roll.num_tokens / seconds, bound


TOOL_SHOTS = (
    "Q: How many feet is 3 yards?\nA: 1 yard = 3 feet.\n<calc>3 * 3</calc> = 9\n<answer>9</answer>\n\n"
    "Q: Convert 12.5 kg to pounds.\nA: 1 pound = 0.4535924 kilograms.\n<calc>12.5 / 0.4535924</calc>"
    " = 27.55778277\n<answer>27.55778277</answer>\n\n"
)


def tool_rows(model, tok, n: int, new_tokens: int, batch: int) -> None:
    """Batched decoding of the same prompts without and with the calculator in the loop."""
    import torch

    from posttrain.rollout import GenerationConfig, generate
    from posttrain.tasks import TaskConfig, load_task
    from posttrain.tools import Toolbox, ToolConfig

    rows = load_task(TaskConfig(name="unit_conversion", strategy="direct")).rows("validation")
    prompts = [f"{TOOL_SHOTS}Q: {rows[i % len(rows)]['question']}\nA:" for i in range(n)]
    cfg = GenerationConfig(temperature=0.7, max_new_tokens=new_tokens, stop=["</answer>"])
    box = Toolbox.from_config(ToolConfig(names=["calculator"]))
    results = []
    for label, tools in (("plain", None), ("calculator", box)):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        roll = generate(model, tok, prompts, cfg, batch_size=batch, tools=tools)
        secs = time.perf_counter() - t0
        n_tok = int(roll.completion_mask.sum())
        calls = sum(len(c) for c in roll.tool_calls) if roll.tool_calls else 0
        tool_tok = int(roll.tool_mask.sum()) if roll.tool_mask is not None else 0
        results.append((label, n_tok, tool_tok, calls, secs, n_tok / secs))
    print(f"\nwith tools: {n} unit-conversion prompts after 2 worked examples, batch {batch}\n")
    print("| tools | tokens | of which tool | calls | seconds | tokens/s | x plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, n_tok, tool_tok, calls, secs, tps in results:
        print(
            f"| {label} | {n_tok} | {tool_tok} | {calls} | {secs:.1f} | {tps:.1f} | {tps / results[0][5]:.2f} |"
        )


if __name__ == "__main__":
    main()
