"""One-minute GPU bench (`make gpu-check` runs it after the gpu test tier): the embedded default
(SmolLM2-135M-Instruct) in bf16 on one CUDA device.

    python bench/gpu_bench.py                 # ~1 minute; --seconds 30 for less
    python bench/gpu_bench.py --model DIR     # another model

Prints one JSON line: generated tokens/s at batch 1 and 64 (greedy, 64 new tokens, KV cache), and
trained tokens/s of a full-weight forward + backward + AdamW step (batch 16 x 256 tokens). Each
number is the median of the repeats that fit in its share of the time. Without CUDA it says so and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, budget_s: float) -> float:
    """Median seconds of fn() over the repeats that fit in budget_s (at least 2, after a warm-up)."""
    import torch

    fn()
    torch.cuda.synchronize()
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < 2 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu bench: no CUDA device here; nothing measured")
        return 0
    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    model, tok = load_model(args.model, device="cuda", dtype="bfloat16")
    share = args.seconds / 3
    out: dict = {"device": torch.cuda.get_device_name(), "model": args.model, "dtype": "bfloat16"}
    cfg = GenerationConfig(temperature=0, max_new_tokens=64, stop=[])
    for batch in (1, 64):
        prompts = [f"Write a short story about the number {i}." for i in range(batch)]
        tokens = int(generate(model, tok, prompts, cfg).completion_mask.sum())  # EOS ends some
        s = timed(lambda p=prompts: generate(model, tok, p, cfg), share)
        out[f"generate_tok_s_b{batch}"] = round(tokens / s, 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    ids = torch.randint(0, len(tok), (16, 256), device="cuda")

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["train_tok_s_b16x256"] = round(16 * 256 / timed(step, share), 1)
    out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
