"""What makes a CPU run fast: oneDNN linear kernels and reuse of freed memory.

**oneDNN linear layers.** torch runs an fp32 `nn.Linear` on a CPU with MKL's sgemm. On the AMD
EPYC this project is measured on, oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the
kernel torch.compile's CPU backend calls) is faster at every shape a post-training step has: about
2x at a decode step (8 rows) on a weight reordered into oneDNN's blocked layout, 1.1-1.3x at a
training step's few hundred rows on the plain weight (`python bench/linear_kernels.py` prints
the table). Both compute in fp32; results differ from MKL's in summation order only. Two ways in,
both for every plain `nn.Linear` with an fp32 weight on the CPU (LoRA's base and adapter layers
included: peft builds them from `nn.Linear`):
- `use_onednn(model)`: from then on the model's layers run their forward product and their
  input's gradient through oneDNN on their plain weights (no copy); the weight's gradient keeps
  torch's kernel, which measured faster for it. Only models whose caller asks are switched: the
  policy when `run.onednn` is on (`train.load_policy(..., onednn=)`, `models.load_model(...,
  onednn=)`); teachers, evaluators and reward models keep torch's kernels.
- `packed_linears(model)`: a context for no-grad inference (the sampler's decode loop) on the
  layers `use_onednn` switched. Every such weight is reordered once on entry (about 0.25 s for the
  135M default model) and the copies are dropped on exit, so the weights may change between two
  uses.
Anything else (autocast on, another dtype or device, a subclass with its own forward) takes
torch's own path. There is no process-wide switch: a layer runs oneDNN because it was switched.

**Reuse of freed memory.** glibc hands blocks over 128 KiB-32 MiB to the kernel when torch frees
them, and a training step frees and re-allocates about a gigabyte (gradients, activations,
logits) every step: the kernel then zeroes every page again on first touch, which measured
~1 s of system time in a 2.3 s backward. `reuse_freed_memory()` tells glibc to serve large
blocks from its heap and keep what is freed (`run.reuse_memory`).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def available() -> bool:
    """True when this torch has oneDNN's linear kernels."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x (..., in) @ weight (out, in)^T + bias, weight plain or reordered by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _eligible(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        isinstance(m, nn.Linear)
        and type(m).forward is nn.Linear.forward
        and type(w) in (torch.Tensor, nn.Parameter)
        and w.device.type == "cpu"
        and w.dtype == torch.float32
    )


def _plain(x: torch.Tensor, m: nn.Linear) -> bool:
    """oneDNN applies: fp32 CPU input, no autocast, the weight still an fp32 CPU tensor."""
    return (
        x.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() >= 2
        and m.weight.dtype == torch.float32
        and m.weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
    )


@contextlib.contextmanager
def packed_linears(model: nn.Module) -> Iterator[int]:
    """Within the block, the model's layers that `use_onednn` switched multiply by a
    oneDNN-reordered copy of their weight when no gradient is recorded. Yields how many layers it
    reordered (0 for a model nobody switched)."""
    patched: list[tuple[nn.Module, Any]] = []
    if available():
        with torch.no_grad():
            for m in model.modules():
                if _eligible(m) and switched(m):
                    packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), None)
                    previous = m.__dict__.get("forward")
                    patched.append((m, previous))
                    m.forward = _packed_forward(m, packed, previous)  # type: ignore[method-assign]
    try:
        yield len(patched)
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def _packed_forward(m: nn.Linear, packed: torch.Tensor, previous: Any) -> Any:
    """forward on the reordered weight; outside no-grad fp32, the layer's own forward."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and _plain(x, m):
            return onednn_linear(x, packed, m.bias)
        return previous(x) if previous is not None else F.linear(x, m.weight, m.bias)

    return forward


class _Linear(torch.autograd.Function):
    """y = x @ w^T + b with the forward product and the input's gradient on oneDNN. The weight's
    gradient stays on torch's kernel: oneDNN measured slower on its transposed operands."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return onednn_linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g2, w.t()).view(*grad.shape[:-1], w.shape[1])  # (..., in)
        if ctx.needs_input_grad[1]:
            gw = g2.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward through oneDNN (bound to each layer: a deep copy rebinds it)."""
    if not _plain(x, self):
        return F.linear(x, self.weight, self.bias)
    if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
        return _Linear.apply(x, self.weight, self.bias)
    return onednn_linear(x, self.weight, self.bias)


def switched(m: nn.Module) -> bool:
    """Whether `use_onednn` switched this layer."""
    forward = m.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _onednn_forward


def use_onednn(model: nn.Module) -> int:
    """Route the model's fp32 CPU linear layers through oneDNN from now on (training and
    inference). Returns how many layers it switched (0 when oneDNN is off or unavailable)."""
    if not available():
        return 0
    n = 0
    for m in model.modules():
        if _eligible(m) and "forward" not in m.__dict__:
            m.forward = types.MethodType(_onednn_forward, m)  # type: ignore[method-assign]
            n += 1
    return n


def reuse_freed_memory() -> bool:
    """glibc: serve every block from the heap (no mmap) and never give freed heap back, so
    memory torch frees is reused without new page faults. Returns whether it applied (Linux
    with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
