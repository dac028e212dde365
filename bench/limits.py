"""The machine's limits and the work a model does: what "% of limit" in the bench tables means.

Two halves:
- `measure_peaks`: the matmul peak (fp32 and bf16 GFLOP/s, best `torch.mm` over a few square
  sizes) and the memory read bandwidth (GB/s, best reduction over a buffer far bigger than the
  last-level cache), at a given thread count. A few seconds.
- Pure arithmetic on a transformers config (no torch): matmul parameters per token, FLOPs of a
  training step or a scoring pass, bytes streamed and FLOPs per decode step, and the roofline
  bound that turns them into seconds or tokens/s.

The counts are for Llama-like decoders (bias-free linear layers, RMSNorm, SwiGLU MLP, grouped-query
attention); biases, norms, rotary embeddings, softmax and the optimizer step are left out of the
FLOPs (each is O(hidden) per token against O(hidden^2) for the matmuls).

    from limits import measure_peaks, model_counts, decode_limit_tokens_per_s
    peaks = measure_peaks(threads=2)
    counts = model_counts(model.config)
    decode_limit_tokens_per_s(peaks, counts, batch=8, context_len=100, dtype="float32")
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

BYTES_PER_ELEM = {"float32": 4, "bfloat16": 2}
"""Bytes per weight and per KV-cache element for the dtypes the bench runs."""


@dataclass(frozen=True)
class Peaks:
    """What the machine can do at `threads` threads, as measured by `measure_peaks`."""

    fp32_gflops: float
    """Best fp32 `torch.mm` throughput, 1e9 FLOP/s (a multiply-add counts 2)."""
    bf16_gflops: float
    """Best bf16 `torch.mm` throughput, 1e9 FLOP/s."""
    read_gbs: float
    """Best memory read bandwidth of a reduction over a buffer far bigger than the LLC, 1e9 B/s."""
    cpu: str
    """The CPU model ("model name" in /proc/cpuinfo)."""
    threads: int

    def matmul_gflops(self, dtype: str) -> float:
        """The matmul peak for "float32" or "bfloat16"."""
        peaks = {"float32": self.fp32_gflops, "bfloat16": self.bf16_gflops}
        if dtype not in peaks:
            raise ValueError(f"no matmul peak measured for {dtype!r}: use one of {list(peaks)}")
        return peaks[dtype]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else the arch."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_seconds(fn: Callable[[], Any], budget_s: float, min_runs: int = 2) -> float:
    """Fastest of repeated calls of fn (after one untimed warm-up), until budget_s is spent."""
    fn()
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def measure_peaks(
    threads: int,
    seconds: float = 3.0,
    *,
    sizes: tuple[int, ...] = (1024, 2048),
    read_mib: int = 512,
) -> Peaks:
    """Measure the matmul peaks and the read bandwidth at `threads` threads in about `seconds`.

    Matmul: best GFLOP/s of `torch.mm` on (n, n) x (n, n) for each n in sizes (2 n^3 FLOPs), fp32
    and bf16; two thirds of the time. Read bandwidth: best of `x.sum()` and `x.amax()` over a
    `read_mib` MiB fp32 buffer (either can be the faster one, depending on the CPU); the last third.
    Best-of, not mean: the peak is what the machine can do when nothing else gets in the way. The
    thread count is restored afterwards; tests pass small sizes to keep it to milliseconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        slice_s = seconds * 2 / 3 / (2 * len(sizes))
        gflops = {}
        for dtype in (torch.float32, torch.bfloat16):
            best = 0.0
            for n in sizes:
                a = torch.randn(n, n, dtype=dtype)
                b = torch.randn(n, n, dtype=dtype)
                best = max(best, 2 * n**3 / _best_seconds(lambda a=a, b=b: torch.mm(a, b), slice_s))
            gflops[dtype] = best / 1e9
        x = torch.ones(read_mib * 2**20 // 4)
        read_s = min(_best_seconds(fn, seconds / 6) for fn in (x.sum, x.amax))
        read_gbs = x.numel() * 4 / read_s / 1e9
    finally:
        torch.set_num_threads(before)
    return Peaks(
        fp32_gflops=gflops[torch.float32],
        bf16_gflops=gflops[torch.bfloat16],
        read_gbs=read_gbs,
        cpu=cpu_model(),
        threads=threads,
    )


@dataclass(frozen=True)
class ModelCounts:
    """Sizes of a Llama-like decoder that the FLOP and byte counts need."""

    matmul_params: int
    """Weights of all linear layers, LM head included (even when tied to the embedding): each
    does one multiply-add per token. The embedding lookup does no matmul and is not counted."""
    total_params: int
    """All parameters, a tied embedding counted once (= sum of `model.parameters()` sizes)."""
    norm_params: int
    """RMSNorm weights (2 per layer + the final one): read every step, like the matmul weights."""
    layers: int
    hidden: int
    attn_width: int
    """num_attention_heads * head_dim: the width of queries (= hidden in most models)."""
    kv_width: int
    """num_key_value_heads * head_dim: the width of each of K and V in the cache."""
    head_params: int = 0
    """Weights of the LM head (vocab * hidden), part of matmul_params."""

    def headless(self) -> ModelCounts:
        """The same trunk with a scalar head instead of the LM head (a value or reward model)."""
        return dataclasses.replace(self, matmul_params=self.matmul_params - self.head_params,
                                   head_params=0)  # fmt: skip


def model_counts(config: Any) -> ModelCounts:
    """Count a transformers decoder config (LlamaConfig-like).

    Per layer, with h = hidden_size, q = heads * head_dim, kv = kv_heads * head_dim,
    i = intermediate_size:
        attention: h*q (q_proj) + 2*h*kv (k_proj, v_proj) + q*h (o_proj)
        MLP:       3*h*i (gate, up, down)
    matmul_params = layers * (attention + MLP) + h * vocab (LM head)
    total_params  = vocab * h (embedding) + layers * (attention + MLP + 2h) + h (final norm)
                    + h * vocab if the LM head is not tied to the embedding
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    layers = config.num_hidden_layers
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * config.intermediate_size
    head = h * config.vocab_size
    norms = layers * 2 * h + h
    tied = getattr(config, "tie_word_embeddings", True)
    return ModelCounts(
        matmul_params=layers * per_layer + head,
        total_params=head + layers * per_layer + norms + (0 if tied else head),
        norm_params=norms,
        layers=layers,
        hidden=h,
        attn_width=q,
        kv_width=kv,
        head_params=head,
    )


def causal_context(seq_len: int) -> float:
    """Mean number of keys a query attends to under a causal mask over seq_len tokens: (T+1)/2.
    Pass it as `attn_context_tokens` to count only the unmasked half of the score matrix."""
    return (seq_len + 1) / 2


def forward_flops(counts: ModelCounts, tokens: int, attn_context_tokens: float = 0.0) -> float:
    """FLOPs of one forward (scoring) pass over `tokens` tokens, e.g. reference or old log-probs.

        2 * matmul_params * tokens                                   (weights: multiply + add)
      + 4 * layers * attn_width * attn_context_tokens * tokens       (Q K^T and P V)

    attn_context_tokens is the mean number of keys each query token attends to: for a causal
    sequence of length T pass `causal_context(T)` = (T+1)/2, i.e. count only the unmasked half
    (the useful work; a kernel that computes the masked half too does extra work that is not
    counted). 0 leaves attention out."""
    attn = 4 * counts.layers * counts.attn_width * attn_context_tokens
    return (2 * counts.matmul_params + attn) * tokens


def train_flops(counts: ModelCounts, tokens: int, attn_context_tokens: float = 0.0) -> float:
    """FLOPs of a training step (forward + backward) over `tokens` tokens: 3x the forward.

        6 * matmul_params * tokens                                   (fwd 2, bwd 4: input + weight grads)
      + 3 * 4 * layers * attn_width * attn_context_tokens * tokens   (attention, fwd + bwd)

    attn_context_tokens as in `forward_flops` (causal: (T+1)/2, the unmasked half). Full
    fine-tuning: under LoRA the frozen weights need no weight gradient, so the true work is closer
    to 4 * matmul_params per token, and this count overstates it."""
    return 3 * forward_flops(counts, tokens, attn_context_tokens)


def decode_step_bytes(
    counts: ModelCounts,
    batch: int,
    context_len: float,
    bytes_per_param: int,
    kv_bytes_per_elem: int,
) -> float:
    """Bytes one decode step (one new token for each of `batch` rows) must read from memory.

        bytes_per_param * (matmul_params + norm_params)           every weight, once per step
      + bytes_per_param * batch * hidden                           the batch's embedding rows
      + kv_bytes_per_elem * 2 * layers * kv_width * context_len * batch    the KV cache (K and V)

    context_len: tokens already in each row's cache. The whole embedding table is read only when
    it is the (tied) LM head, which matmul_params already counts. Activations and the cache write
    of the new token (O(batch * hidden)) are left out."""
    weights = bytes_per_param * (counts.matmul_params + counts.norm_params + batch * counts.hidden)
    kv = kv_bytes_per_elem * 2 * counts.layers * counts.kv_width * context_len * batch
    return weights + kv


def decode_step_flops(counts: ModelCounts, batch: int, context_len: float) -> float:
    """FLOPs of one decode step: a forward over `batch` new tokens, each attending to context_len
    cached keys (`forward_flops` with attn_context_tokens = context_len)."""
    return forward_flops(counts, batch, attn_context_tokens=context_len)


def decode_step_seconds(
    peaks: Peaks, counts: ModelCounts, batch: int, context_len: float, dtype: str
) -> tuple[float, float]:
    """(memory seconds, compute seconds) of one decode step at the machine's peaks: the bytes at
    the read bandwidth and the FLOPs at the matmul peak of `dtype` (weights and cache in dtype)."""
    flop_s = peaks.matmul_gflops(dtype) * 1e9  # raises for a dtype without a measured peak
    nbytes = BYTES_PER_ELEM[dtype]
    memory_s = decode_step_bytes(counts, batch, context_len, nbytes, nbytes) / (
        peaks.read_gbs * 1e9
    )
    return memory_s, decode_step_flops(counts, batch, context_len) / flop_s


def decode_limit_tokens_per_s(
    peaks: Peaks, counts: ModelCounts, batch: int, context_len: float, dtype: str
) -> float:
    """Roofline bound on decoding: batch / max(bytes / bandwidth, FLOPs / matmul peak) tokens/s.

    Small batches are bound by memory (every step streams all the weights for `batch` tokens),
    large ones by compute; a sampler cannot beat this (it can overlap the two at best)."""
    return batch / max(decode_step_seconds(peaks, counts, batch, context_len, dtype))


def rollout_seconds(
    peaks: Peaks,
    counts: ModelCounts,
    *,
    prompt_tokens: int,
    prompt_attn_context: float,
    new_tokens: float,
    batch: int,
    context_len: float,
    dtype: str,
) -> tuple[float, str]:
    """(fewest seconds, "memory" or "compute") to sample a batch: the prompts' prefill
    (`forward_flops` at the matmul peak) plus one decode step per new token of each row
    (new_tokens / batch steps at `decode_step_seconds`, the roofline for `batch` rows whose cache
    holds `context_len` tokens). The bound names the decode step's side of the roofline."""
    prefill = train_limit_seconds(
        peaks, forward_flops(counts, prompt_tokens, prompt_attn_context), dtype
    )
    memory_s, compute_s = decode_step_seconds(peaks, counts, batch, context_len, dtype)
    bound = "memory" if memory_s >= compute_s else "compute"
    return prefill + new_tokens / batch * max(memory_s, compute_s), bound


def train_limit_seconds(peaks: Peaks, flops: float, dtype: str) -> float:
    """Fewest seconds `flops` FLOPs can take: flops / the matmul peak of `dtype`."""
    return flops / (peaks.matmul_gflops(dtype) * 1e9)


def pct_of_limit(measured: float, limit: float) -> str:
    """`measured` as a share of `limit`, both rates (tokens/s, FLOP/s), e.g. "42%"; "-" if no
    limit. For times, pass (limit seconds, measured seconds)."""
    if limit <= 0:
        return "-"
    return f"{100 * measured / limit:.0f}%"
