"""bench/limits.py: FLOP and byte counts against hand-computed numbers on a tiny Llama config,
the roofline's choice of bound, and the counts against a real model's layers.

The tiny config: hidden h = 16, 2 layers, intermediate i = 32, 4 heads of head_dim 4 (q = 16),
2 KV heads (kv = 8), vocab 64, LM head tied to the embedding.
    per layer: q_proj 16*16 = 256, k_proj 16*8 = 128, v_proj 16*8 = 128, o_proj 16*16 = 256,
               gate + up + down 3*16*32 = 1536                        -> 2304
    matmul params: 2 layers * 2304 + LM head 16*64 = 1024             -> 5632
    norms: 2 layers * 2 * 16 + final 16                               -> 80
    total: embedding 1024 (tied: the head adds none) + 4608 + 80      -> 5712
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

from limits import (  # noqa: E402
    Peaks,
    causal_context,
    decode_limit_tokens_per_s,
    decode_step_bytes,
    decode_step_flops,
    decode_step_seconds,
    forward_flops,
    measure_peaks,
    model_counts,
    pct_of_limit,
    rollout_seconds,
    train_flops,
    train_limit_seconds,
)


@pytest.fixture()
def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=16,
        num_hidden_layers=2,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
    )


def peaks(fp32: float = 100.0, bf16: float = 200.0, read: float = 10.0) -> Peaks:
    return Peaks(fp32_gflops=fp32, bf16_gflops=bf16, read_gbs=read, cpu="test", threads=1)


def test_model_counts_by_hand(tiny_config):
    c = model_counts(tiny_config)
    assert (c.matmul_params, c.norm_params, c.total_params) == (5632, 80, 5712)
    assert (c.layers, c.hidden, c.attn_width, c.kv_width) == (2, 16, 16, 8)
    assert c.head_params == 1024 and c.headless().matmul_params == 5632 - 1024  # vocab 64 x 16


def test_untied_head_adds_its_weights_to_the_total_only(tiny_config):
    tiny_config.tie_word_embeddings = False
    c = model_counts(tiny_config)
    assert (c.matmul_params, c.total_params) == (5632, 5712 + 1024)


def test_counts_match_a_real_model():
    """model_counts against the modules of conftest's tiny Llama (hidden 32, untied head)."""
    import torch
    from conftest import build_model, build_tokenizer

    model = build_model(build_tokenizer())
    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    c = model_counts(model.config)
    assert c.matmul_params == linear
    assert c.total_params == sum(p.numel() for p in model.parameters())


def test_train_and_forward_flops_by_hand(tiny_config):
    """10 tokens, each attending to 5 keys:
    forward: 2 * 5632 * 10 = 112640 (weights) + 4 * 2 layers * 16 * 5 * 10 = 6400 (attention)
    train: 3x the forward = 6 * 5632 * 10 = 337920 + 3 * 6400 = 19200 -> 357120."""
    c = model_counts(tiny_config)
    assert forward_flops(c, 10, attn_context_tokens=5) == 119040
    assert train_flops(c, 10, attn_context_tokens=5) == 357120
    assert train_flops(c, 10) == 337920  # attention left out


def test_causal_context_is_the_unmasked_half():
    assert causal_context(9) == 5  # queries see 1..9 keys: mean 5
    assert causal_context(1) == 1


def test_decode_step_bytes_and_flops_by_hand(tiny_config):
    """Batch 4, 10 tokens in each row's cache, fp32 weights and cache:
    weights (5632 + 80) * 4 = 22848, embedding rows 4 * 16 * 4 = 256,
    KV 2 (K and V) * 2 layers * 8 * 10 * 4 rows * 4 bytes = 5120           -> 28224 bytes.
    FLOPs: 2 * 5632 * 4 = 45056 + 4 * 2 layers * 16 * 10 * 4 = 5120         -> 50176."""
    c = model_counts(tiny_config)
    assert decode_step_bytes(c, 4, 10, bytes_per_param=4, kv_bytes_per_elem=4) == 28224
    assert decode_step_flops(c, 4, 10) == 50176


def test_roofline_picks_the_slower_side(tiny_config):
    """Memory bound: 28224 B at 10 GB/s = 2.8224 us > 50176 FLOPs at 100 GFLOP/s = 0.50176 us.
    Compute bound at 0.001 GFLOP/s: 50176 / 1e6 = 0.050176 s > 2.8224 us.
    bf16 halves the bytes: 5712 * 2 + 4 * 16 * 2 + 5120 / 2 = 14112 B, at 10 GB/s."""
    c = model_counts(tiny_config)
    mem = decode_limit_tokens_per_s(peaks(), c, batch=4, context_len=10, dtype="float32")
    assert mem == pytest.approx(4 / 2.8224e-6)
    slow = peaks(fp32=0.001)
    assert decode_limit_tokens_per_s(slow, c, 4, 10, "float32") == pytest.approx(4 / 0.050176)
    assert decode_limit_tokens_per_s(peaks(), c, 4, 10, "bfloat16") == pytest.approx(4 / 1.4112e-6)
    with pytest.raises(ValueError, match="float16"):
        decode_limit_tokens_per_s(peaks(), c, 4, 10, "float16")


def test_train_limit_and_percent():
    assert train_limit_seconds(peaks(), 2e11, "float32") == pytest.approx(2.0)
    assert train_limit_seconds(peaks(), 2e11, "bfloat16") == pytest.approx(1.0)
    assert pct_of_limit(42.0, 100.0) == "42%"
    assert pct_of_limit(1.0, 0.0) == "-"


def test_measure_peaks_small():
    """Milliseconds with small sizes: positive peaks, the thread count restored."""
    import torch

    before = torch.get_num_threads()
    p = measure_peaks(1, seconds=0.05, sizes=(64,), read_mib=4)
    assert p.fp32_gflops > 0 and p.bf16_gflops > 0 and p.read_gbs > 0
    assert p.threads == 1 and p.cpu
    assert torch.get_num_threads() == before


def test_rollout_seconds_is_prefill_plus_decode_steps(tiny_config):
    """Prefill of 10 prompt tokens without attention: 2 * 5632 * 10 = 112640 FLOPs at 100 GFLOP/s;
    then 16 new tokens over a batch of 4 = 4 decode steps at the roofline step time."""
    c, p = model_counts(tiny_config), peaks()
    step = max(decode_step_seconds(p, c, 4, 20.0, "float32"))
    got, bound = rollout_seconds(p, c, prompt_tokens=10, prompt_attn_context=0.0, new_tokens=16,
                                 batch=4, context_len=20.0, dtype="float32")  # fmt: skip
    assert got == pytest.approx(112640 / 100e9 + 4 * step)
    memory_s, compute_s = decode_step_seconds(p, c, 4, 20.0, "float32")
    assert bound == ("memory" if memory_s >= compute_s else "compute")
