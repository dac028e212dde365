"""fp32 linear kernels side by side: torch's default (MKL sgemm) against oneDNN, on the shapes of
the embedded default model's layers (SmolLM2-135M: 30 blocks of q, k, v, o, gate, up, down, and
the output head).

    python bench/linear_kernels.py                  # 2 threads, rows 8 (a decode step), 256, 410
    python bench/linear_kernels.py --threads 1 --rows 1,8,64

For each row count N it times one pass of x (N, in) @ W^T over all 211 weights, best of
`--repeats`, in milliseconds: `F.linear` (torch's default), oneDNN on the plain weight (what
`posttrain.cpu.use_onednn` runs in training forwards) and oneDNN on weights reordered once
(what `posttrain.cpu.packed_linears` runs), oneDNN and MKL's packed GEMM on weights laid out
for N rows (what `posttrain.decoder` runs while sampling), and how long the reordering takes.
It also prints the largest difference between the kernels' outputs, relative to the output's
scale: both are fp32 and differ in summation order only. `--inductor` adds torch.compile's CPU
GEMM (inductor with frozen weights and `max-autotune`, which generates its own micro-kernels
and picks between them and oneDNN/MKL by timing them; it compiles for each row count, about a
minute each on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: hidden 576, MLP 1536, 9 query heads and 3 key/value heads of 64
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
BLOCKS = 30
HEAD = (49152, 576)  # the output head (tied to the embedding)


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def best_ms(calls: list, repeats: int) -> float:
    """Best of `repeats` passes over calls [(x, weight, kernel)], in milliseconds."""
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        t = time.perf_counter()
        for x, w, kernel in calls:
            kernel(x, w)
        times.append(time.perf_counter() - t)
    return min(times[1:]) * 1000


def inductor_ms(weights: list[torch.Tensor], n: int, repeats: int) -> float:
    """Best ms of one pass over all weights for n rows through torch.compile (inductor, frozen
    weights, max-autotune)."""
    import torch._inductor.config as inductor_config

    class Linears(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ws = torch.nn.ParameterList(torch.nn.Parameter(w, False) for w in weights)

        def forward(self, x: torch.Tensor, wide: torch.Tensor) -> list[torch.Tensor]:
            return [F.linear(x if w.shape[1] == x.shape[1] else wide, w) for w in self.ws]

    x, wide = torch.randn(n, SHAPES[0][1]), torch.randn(n, SHAPES[-1][1])
    with torch.no_grad(), inductor_config.patch(freezing=True):
        compiled = torch.compile(Linears().eval(), mode="max-autotune")
        compiled(x, wide)  # compiles
        return best_ms([(x, wide, compiled)], repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="8,256,410")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--inductor", action="store_true", help="add torch.compile's GEMM (slow to compile)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [s for _ in range(BLOCKS) for s in SHAPES] + [HEAD]
    weights = [torch.randn(o, i) * i**-0.5 for o, i in shapes]
    t = time.perf_counter()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    reorder_ms = (time.perf_counter() - t) * 1000
    mb = sum(w.numel() for w in weights) * 4 / 2**20
    print(f"{len(weights)} weights, {mb:.0f} MB fp32, {args.threads} threads; "
          f"reordering them for oneDNN took {reorder_ms:.0f} ms\n")  # fmt: skip
    print("| rows | torch F.linear (MKL) ms | MKL packed for the rows ms | oneDNN plain weight ms "
          "| oneDNN reordered ms | oneDNN reordered for the rows ms | speed-up plain "
          "| speed-up reordered | max rel. difference | inductor ms |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for n in [int(r) for r in args.rows.split(",")]:
            xs = {i: torch.randn(n, i) for i in {i for _, i in SHAPES}}
            runs = {
                "torch": [(xs[w.shape[1]], w, F.linear) for w in weights],
                "plain": [(xs[w.shape[1]], w, onednn) for w in weights],
                "reordered": [(xs[w.shape[1]], p, onednn) for w, p in zip(weights, packed)],
            }
            # the layouts chosen for this row count (what posttrain.decoder uses while sampling)
            sized = [torch.ops.mkldnn._reorder_linear_weight(w, n) for w in weights]
            runs["sized"] = [(xs[w.shape[1]], p, onednn) for w, p in zip(weights, sized)]
            mkl = [(w, torch.ops.mkl._mkl_reorder_linear_weight(w, n)) for w in weights]
            runs["mkl"] = [
                (xs[w.shape[1]], (w, p), lambda x, wp, n=n: torch.ops.mkl._mkl_linear(x, wp[1], wp[0], None, n))
                for w, p in mkl
            ]  # fmt: skip
            ms = {k: best_ms(calls, args.repeats) for k, calls in runs.items()}
            del sized, mkl, runs["sized"], runs["mkl"]
            diff = max(
                float((onednn(x, p) - F.linear(x, w)).abs().max() / F.linear(x, w).abs().max())
                for (x, w, _), (_, p, _) in zip(runs["torch"][:7], runs["reordered"][:7])
            )
            t, pl, pk = ms["torch"], ms["plain"], ms["reordered"]
            ind = f"{inductor_ms(weights, n, args.repeats):.1f}" if args.inductor else "-"
            print(f"| {n} | {t:.1f} | {ms['mkl']:.1f} | {pl:.1f} | {pk:.1f} | {ms['sized']:.1f} "
                  f"| {t / pl:.2f} | {t / pk:.2f} | {diff:.1e} | {ind} |")  # fmt: skip


if __name__ == "__main__":
    main()
