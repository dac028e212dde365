"""Where a lean decode step's time goes: the whole step against the step without its matrix
products (each product's output replayed from a cache), on the embedded default.

    python bench/profile_decoder.py                    # 8 and 32 rows, fp32 and bf16, 2 threads
    python bench/profile_decoder.py --rows 8 --dtypes float32

For each row count and dtype: random 60-token prompts are prefilled by the model, a
`posttrain.decoder.LeanDecoder` takes over their cache and decodes 30 greedy steps; the median
step is printed twice, as it is and with every product replaced by a lookup of its first output
(the rest of the step: attention, norms, rotary embedding, cache writes, Python). The difference
is what the products cost inside a step. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch


def median_ms(times: list[float]) -> float:
    return sorted(times)[len(times) // 2] * 1e3


def decode_ms(dec: Any, out: Any, cache_mask: torch.Tensor, steps: int) -> float:
    """Median ms of `steps` greedy lean steps after the prefill `out` (its cache and mask)."""
    from posttrain.ops import position_ids_from_mask

    dec.load(out.cache, cache_mask, steps)
    nxt = out.logits[:, -1].argmax(-1)
    pos = position_ids_from_mask(cache_mask)[:, -1:]
    times = []
    for _ in range(steps):
        pos = pos + 1
        t0 = time.perf_counter()
        logits = dec.step(nxt, pos)
        times.append(time.perf_counter() - t0)
        nxt = logits.argmax(-1)
    return median_ms(times)


def replay_products(dec: Any) -> None:
    """Each product of `dec` returns its call site's first output from then on."""
    replay: dict[tuple, torch.Tensor] = {}

    def wrap(name: str, real: Any) -> Any:
        def cached(*a: Any) -> torch.Tensor:
            key = (name, tuple(a[0].shape), id(a[-2]))  # the call and its weight
            if key not in replay:
                replay[key] = real(*a)
            return replay[key]

        return cached

    for name in ("_mm", "_mm_silu", "_mm_mul", "_mm_add"):
        setattr(dec, name, wrap(name, getattr(dec, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="8,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from posttrain.decoder import LeanDecoder
    from posttrain.forwards import prompt_pass
    from posttrain.models import load_model

    model, _ = load_model(args.model, onednn=True)
    model.eval()
    print("| rows | dtype | step ms | without products ms | products ms |")
    print("|---:|---|---:|---:|---:|")
    for B in [int(r) for r in args.rows.split(",")]:
        torch.manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (B, args.prompt_tokens))
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            with torch.no_grad():
                out, cache_mask = prompt_pass(model, ids, torch.ones_like(ids))
                dec = LeanDecoder.build(model, None if dtype == torch.float32 else dtype, B)
                assert dec is not None, "the lean decoder does not apply to this model"
                whole = decode_ms(dec, out, cache_mask, args.steps)
                replay_products(dec)
                rest = decode_ms(dec, out, cache_mask, args.steps)
            print(f"| {B} | {name} | {whole:.1f} | {rest:.1f} | {whole - rest:.1f} |", flush=True)


if __name__ == "__main__":
    main()
