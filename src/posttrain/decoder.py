"""A lean decode step for Llama-architecture models: the sampler's token-by-token loop without the
per-layer overhead of the general model code.

One decode step of a 135M-parameter model at 8 rows multiplies by about 0.5 GB of weights in
~25 ms; transformers' forward around those products (module calls, a KV cache that grows by
`torch.cat`, key/value heads repeated for grouped-query attention, masks rebuilt every step) took
as long again. `LeanDecoder` freezes the model's weights for one rollout and runs the step with:
- q, k and v as one product and gate and up as one (fewer, larger matrix products), on weights
  reordered once for oneDNN where `run.onednn` chose oneDNN for decoding (`cpu.decodes_onednn`:
  true, or "auto" where it measured faster), otherwise torch's own kernel on the plain copies;
- a KV cache allocated once for the whole rollout (prompt + max_new_tokens columns) and written
  in place, so a step copies nothing it has copied before;
- grouped-query attention as batched products of each key/value head with its group of query
  heads (no repeated keys and values), under an additive mask kept across steps.
The maths is the model's own (RMSNorm, rotary embeddings from the model's `rotary_emb`, SiLU
MLP); logits agree with the model's forward up to float summation order (tests check both).

LoRA (peft) policies decode on their merged weights W + scale * B @ A, taken when the decoder is
built, so an adapter that is disabled (`disable_adapter()`) or not active is left out exactly as
peft's forward leaves it out. Anything else (another architecture, DoRA, quantized or custom
layers, a GPU, CPU autocast on: `run.autocast`) returns None from `LeanDecoder.build` and samples
through the model's forward.

`dtype` decodes with a copy of the weights in another precision (bfloat16 rollouts): activations
and the cache in that dtype, logits returned in fp32.

Shapes: B rows, C cache columns (prompt + new tokens), H query heads, Hkv key/value heads,
D head size, E hidden size, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from posttrain import cpu

SUPPORTED = ("llama",)
"""model_type values whose layers `LeanDecoder` reproduces (checked, with the layers' classes)"""


@dataclass
class _Layer:
    """One block's weights as the decoder multiplies by them (oneDNN-reordered or plain copies)."""

    qkv: torch.Tensor  # ((H + 2 Hkv) D, E): q (scaled by D^-0.5), k, v stacked; q, k interleaved
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # (E, H D)
    o_bias: torch.Tensor | None
    gate: torch.Tensor  # (I, E)
    gate_bias: torch.Tensor | None
    up: torch.Tensor  # (I, E)
    up_bias: torch.Tensor | None
    down: torch.Tensor  # (E, I)
    down_bias: torch.Tensor | None


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (PeftModel -> LoraModel -> the causal LM)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(effective weight, bias) of a plain nn.Linear or a peft LoRA Linear as its forward would
    apply them now (active, enabled, unmerged adapters added); None for anything else, a weight
    that is not a plain tensor (a sharded DTensor) or not of the layer's shape (a flat shard)
    included."""
    if type(layer) is nn.Linear:
        if not _whole(layer):
            return None
        return layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    base = getattr(layer, "base_layer", None)
    if type(base) is not nn.Linear or not hasattr(layer, "get_delta_weight") or not _whole(base):
        return None
    if type(layer).__name__ != "Linear" or not type(layer).__module__.startswith(
        "peft.tuners.lora"
    ):
        return None
    weight = base.weight.detach()
    if not getattr(layer, "disable_adapters", False):
        active = layer.active_adapters
        if any(getattr(layer, "use_dora", {}).get(a, False) for a in active):
            return None
        merged = set(getattr(layer, "merged_adapters", []))
        for name in active:
            if name in layer.lora_A and name not in merged:
                weight = weight + layer.get_delta_weight(name).detach()
    return weight, None if base.bias is None else base.bias.detach()


def _heads_of(cfg: Any) -> tuple[int, int, int]:
    """(query heads H, key/value heads Hkv, head size D) of a Llama config."""
    H = cfg.num_attention_heads
    Hkv = getattr(cfg, "num_key_value_heads", None) or H
    return H, Hkv, getattr(cfg, "head_dim", None) or cfg.hidden_size // H


def _interleave(D: int) -> torch.Tensor:
    """Index (D,) that reorders a head's rotary halves [x_0..x_{D/2-1}, y_0..y_{D/2-1}] into pairs
    [x_0, y_0, x_1, y_1, ...]: each pair then rotates as one complex number."""
    return torch.stack([torch.arange(D // 2), torch.arange(D // 2) + D // 2], -1).flatten()


def _heads(t: torch.Tensor | None, n: int, D: int, scale: float = 1.0) -> torch.Tensor | None:
    """Rows (n D, ...) of n heads with each head's rows interleaved, times scale."""
    if t is None:
        return None
    return t.view(n, D, *t.shape[1:])[:, _interleave(D)].reshape(t.shape) * scale


class LeanDecoder:
    """Decode steps of one Llama-architecture model with its weights frozen at `build` time."""

    def __init__(self, lm: nn.Module, layers: list[_Layer], head: torch.Tensor, onednn: bool,
                 dtype: torch.dtype):  # fmt: skip
        cfg = lm.config
        self.lm = lm
        self.layers = layers
        self.head = head  # (V, E)
        self.onednn = onednn
        self.dtype = dtype
        self.E = cfg.hidden_size
        self.H, self.Hkv, self.D = _heads_of(cfg)
        self.eps = cfg.rms_norm_eps
        self.rotary = lm.model.rotary_emb
        self.keys: list[torch.Tensor] = []  # per layer (B, Hkv, C, D), rotary pairs interleaved
        self.values: list[torch.Tensor] = []  # per layer (B, Hkv, C, D)
        self.bias = torch.empty(0)  # (B Hkv, 1, C) 0 where a row attends, dtype's min elsewhere
        self.length = 0  # cache columns filled

    @classmethod
    def build(
        cls, model: nn.Module, dtype: torch.dtype | None = None, rows: int | None = None
    ) -> LeanDecoder | None:
        """The decoder of `model`, or None where it does not apply (see the module docstring).
        dtype: the precision to decode in (None: the model's); rows: the batch size it will mostly
        decode (oneDNN lays the weights out for it; any other size works too)."""
        lm = _causal_lm(model)
        cfg = getattr(lm, "config", None)
        if getattr(cfg, "model_type", None) not in SUPPORTED:
            return None
        inner = getattr(lm, "model", None)
        head_layer = getattr(lm, "lm_head", None)
        if inner is None or head_layer is None or not hasattr(inner, "rotary_emb"):
            return None
        if type(getattr(inner, "embed_tokens", None)) is not nn.Embedding:
            return None
        if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
            return None
        p = next(lm.parameters())
        if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16):
            return None
        if torch.is_autocast_enabled("cpu"):  # run.autocast: the model's forward, autocast as
            return None  # the training forward that rescores the samples
        dtype = dtype or p.dtype
        # oneDNN where run.onednn chose it for decoding (`cpu.decodes_onednn`), and for bf16
        onednn = cpu.available() and (dtype == torch.bfloat16 or cpu.decodes_onednn(lm))
        pack = _packer(onednn, dtype, rows)
        H, Hkv, D = _heads_of(cfg)
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        layers = []
        with torch.no_grad():  # LoRA's delta weights would otherwise record a graph
            for block in inner.layers:
                norms = (block.input_layernorm, block.post_attention_layernorm)
                if not all(type(n).__name__.endswith("RMSNorm") for n in norms):
                    return None
                owners = [block.self_attn] * 4 + [block.mlp] * 3
                parts = [_weight(getattr(o, n, None)) for o, n in zip(owners, names)]
                if any(x is None for x in parts):
                    return None
                (wq, bq), (wk, bk), (wv, bv), (wo, bo), (wg, bg), (wu, bu), (wd, bd) = parts
                q = (_heads(wq, H, D, D**-0.5), _heads(bq, H, D, D**-0.5))
                qkv, qkv_bias = _stack([q, (_heads(wk, Hkv, D), _heads(bk, Hkv, D)), (wv, bv)])
                # each RMSNorm's weight multiplies the input columns of the products it feeds
                n1, n2 = (n.weight.detach()[None] for n in norms)
                layers.append(
                    _Layer(qkv=pack(qkv * n1), qkv_bias=_cast(qkv_bias, dtype), o=pack(wo),
                           o_bias=_cast(bo, dtype), gate=pack(wg * n2), gate_bias=_cast(bg, dtype),
                           up=pack(wu * n2), up_bias=_cast(bu, dtype), down=pack(wd),
                           down_bias=_cast(bd, dtype))
                )  # fmt: skip
            head = _weight(head_layer)
            if head is None or head[1] is not None:
                return None
            head_weight = pack(head[0] * inner.norm.weight.detach()[None])
            return cls(lm, layers, head_weight, onednn, dtype)

    def load(self, cache: Any, attention_mask: torch.Tensor, new_tokens: int) -> None:
        """Take over a prefilled transformers cache: its keys and values (B, Hkv, K, D) per layer
        and the mask (B, K) of its columns, with room for `new_tokens` more columns."""
        B, K = attention_mask.shape
        C = K + new_tokens
        pairs = _interleave(self.D)
        self.keys, self.values = [], []
        for i in range(len(self.layers)):
            layer = cache.layers[i]
            for src, dst in ((layer.keys[..., pairs], self.keys), (layer.values, self.values)):
                buf = torch.empty(B, self.Hkv, C, self.D, dtype=self.dtype)
                buf[:, :, :K] = src
                dst.append(buf)
        bias = torch.full((B, C), torch.finfo(self.dtype).min, dtype=self.dtype)
        bias[:, :K].masked_fill_(attention_mask.bool(), 0.0)
        self.bias = bias.repeat_interleave(self.Hkv, 0)[:, None]  # (B Hkv, 1, C)
        self.length = K

    @property
    def capacity(self) -> int:
        """Cache columns allocated (C)."""
        return self.keys[0].shape[2]

    def place(self, slot: int, cache: Any, row: int, attention_mask: torch.Tensor) -> None:
        """Refill `slot` with row `row` of a prefilled transformers cache, attention_mask (K,) its
        columns: its p cached positions go to the last p filled columns [length - p, length) and
        the slot attends to nothing else (the columns a finished row left are masked out). Where
        fewer than p columns are filled, the filled count first jumps to p (the skipped columns
        masked for every row). Positions travel with the keys (rotary applied at the prefill),
        so the columns a row sits in do not change its attention."""
        cols = attention_mask.bool().nonzero().flatten()
        p = len(cols)
        if p > self.length:
            if p >= self.capacity:
                raise ValueError(f"a prompt of {p} tokens does not fit a cache of {self.capacity}")
            self.bias[:, :, self.length : p] = torch.finfo(self.dtype).min
            for buf in (*self.keys, *self.values):  # masked, but 0 x NaN is NaN: no garbage
                buf[:, :, self.length : p] = 0.0
            self.length = p
        t = self.length
        pairs = _interleave(self.D)
        for i, layer in enumerate(cache.layers):
            self.keys[i][slot, :, t - p : t] = layer.keys[row][:, cols][..., pairs]
            self.values[i][slot, :, t - p : t] = layer.values[row][:, cols]
        bias = self.bias.view(-1, self.Hkv, 1, self.capacity)[slot]  # (Hkv, 1, C) of the slot
        bias.fill_(torch.finfo(self.dtype).min)
        bias[..., t - p : t] = 0.0

    def compact(self, first: int) -> None:
        """Drop the cache columns [0, first), which no row attends to any more: the filled
        columns move to the front, and `length` shrinks by `first`."""
        L = self.length
        for buf in (*self.keys, *self.values):
            buf[:, :, : L - first] = buf[:, :, first:L].clone()
        self.bias[..., : L - first] = self.bias[..., first:L].clone()
        self.length = L - first

    @torch.no_grad()
    def step(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One token per row: ids (B,), position_ids (B, 1) -> next-token logits (B, V) in fp32.
        Every row attends to the cache's columns its mask allows and to this new column."""
        B, H, Hkv, D, t = ids.shape[0], self.H, self.Hkv, self.D, self.length
        nqk = (H + Hkv) * D
        x = self.lm.model.embed_tokens(ids).to(self.dtype)  # (B, E)
        cos, sin = self.rotary(x, position_ids)  # (B, 1, D), halves equal
        rope = torch.complex(cos[..., : D // 2].float(), sin[..., : D // 2].float())  # (B, 1, D/2)
        self.bias[:, :, t] = 0.0
        bias = self.bias[:, :, : t + 1]  # (B Hkv, 1, t+1)
        C = self.keys[0].shape[2]
        for i, L in enumerate(self.layers):
            qkv = self._mm(self._norm(x), L.qkv, L.qkv_bias)  # (B, (H + 2 Hkv) D)
            qk = qkv[:, :nqk].view(B, H + Hkv, D // 2, 2)
            if self.dtype != torch.float32:
                qk = qk.float()
            qk = torch.view_as_real(torch.view_as_complex(qk) * rope).to(self.dtype)  # rotated
            self.keys[i].select(2, t).copy_(qk[:, H:].view(B, Hkv, D))
            self.values[i].select(2, t).copy_(qkv[:, nqk:].view(B, Hkv, D))
            q = qk[:, :H].reshape(B * Hkv, H // Hkv, D)  # each key/value head's query heads
            k = self.keys[i].view(B * Hkv, C, D)[:, : t + 1]  # (B Hkv, t+1, D)
            v = self.values[i].view(B * Hkv, C, D)[:, : t + 1]
            att = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2)), dim=-1)
            o = torch.bmm(att, v).view(B, H * D)
            x = self._mm_add(o, x, L.o, L.o_bias)
            h = self._norm(x)
            gate = self._mm_silu(h, L.gate, L.gate_bias)  # (B, I)
            x = self._mm_add(self._mm_mul(h, gate, L.up, L.up_bias), x, L.down, L.down_bias)
        self.length = t + 1
        return self._mm(self._norm(x), self.head, None).float()  # (B, V)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next product): x / sqrt(mean(x^2) + eps),
        the mean in fp32."""
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # (B, 1)
        return x * n.square_().mul_(1 / self.E).add_(self.eps).rsqrt_().to(x.dtype)

    # x @ w^T + b, and with an elementwise op fused (oneDNN's post-ops; torch's kernels otherwise)
    def _mm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return cpu.onednn_linear(x, w, b) if self.onednn else F.linear(x, w, b)

    def _mm_silu(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "swish", [], "")
        return F.silu(F.linear(x, w, b))

    def _mm_mul(self, x: torch.Tensor, other: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "mul")
        return F.linear(x, w, b) * other

    def _mm_add(self, x: torch.Tensor, other: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise.binary(x, other, w, b, "add")
        return F.linear(x, w, b) + other


def _whole(layer: nn.Linear) -> bool:
    """The layer's weight is a plain (unsharded) tensor of (out_features, in_features)."""
    w = layer.weight
    return type(w) in (torch.Tensor, nn.Parameter) and tuple(w.shape) == (
        layer.out_features,
        layer.in_features,
    )


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, Any]:
    weight = torch.cat([w for w, _ in parts], 0)
    if all(b is None for _, b in parts):
        return weight, None
    bias = [b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype) for w, b in parts]
    return weight, torch.cat(bias, 0)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _packer(onednn: bool, dtype: torch.dtype, rows: int | None) -> Any:
    """weight (out, in) -> the copy `LeanDecoder` multiplies by (oneDNN-reordered or plain), in
    `dtype`, never sharing storage with the model (its weights may change after the build)."""

    def pack(w: torch.Tensor) -> torch.Tensor:
        if onednn:  # the reordered weight is a new (opaque) tensor: no copy needed before it
            return torch.ops.mkldnn._reorder_linear_weight(w.to(dtype).contiguous(), rows)
        return w.to(dtype, copy=True).contiguous()

    return pack
