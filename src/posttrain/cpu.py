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
- `use_kernels(model, "auto")` (`run.onednn = "auto"`, the default) chooses by measurement on
  the machine at hand: it times torch's kernel against oneDNN on the model's own weight shapes,
  once for a training step's rows (forward product and input gradient) and once for a decode
  step's 8 rows (oneDNN on reordered weights, as the lean decoder runs them), and uses oneDNN
  for each only where it is faster. The choice is printed (`KernelChoice.describe`) and cached
  per CPU model, torch version, threads and shapes in `kernels.json` of posttrain's cache
  directory ($POSTTRAIN_KERNEL_CACHE names another file); each checkpoint records it and a
  resumed run takes it from there (`choices`, `pin`: the same kernels, the same sums);
  `run.onednn = true / false` forces it.
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
import dataclasses
import functools
import json
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
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
                if _eligible(m) and _decodes(m):
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


TRAIN_ROWS = 256
"""rows of the training products `measure_kernels` times (a step's micro-batch runs 300-1000)"""
DECODE_ROWS = 8
"""rows of the decode products it times (the sampler's usual micro-batch)"""
MIN_GAIN = 1.03
"""oneDNN is chosen where it is at least this much faster (a tie keeps torch's kernel)"""


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which kernel a model's fp32 CPU linear products run, and the measurement behind it: torch's
    ms over oneDNN's ms for the model's layers at `TRAIN_ROWS` (forward + input gradient) and at
    `DECODE_ROWS` (on weights reordered for them)."""

    train: bool
    decode: bool
    train_speedup: float
    decode_speedup: float
    source: str = "measured now"  # or "cached measurement", "the resumed run's checkpoint"

    def describe(self) -> str:
        def side(on: bool, x: float, what: str) -> str:
            kernel = "oneDNN" if on else "torch's kernel"
            return f"{what} on {kernel} (oneDNN {x:.2f}x torch's)"

        src = self.source
        return (
            f"kernels: {side(self.train, self.train_speedup, 'training products')}, "
            f"{side(self.decode, self.decode_speedup, 'decode steps')} [{src}; "
            "--run.onednn=true/false forces]"
        )


def decide(
    train_speedup: float, decode_speedup: float, source: str = "measured now"
) -> KernelChoice:
    """oneDNN for each use where it measured at least MIN_GAIN x faster than torch's kernel."""
    return KernelChoice(
        train_speedup >= MIN_GAIN, decode_speedup >= MIN_GAIN, train_speedup, decode_speedup, source
    )


def _best_ms(fn: Callable[..., Any], *args: Any, repeats: int = 3) -> float:
    fn(*args)  # warm-up: oneDNN builds its primitive on the first call of a shape
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def _torch_train(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
    F.linear(x, w)  # the forward product
    g.mm(w)  # the input's gradient, as autograd runs it


def _onednn_train(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
    onednn_linear(x, w)
    onednn_linear(g, w.t())  # as `_Linear.backward` runs it


def _shapes(model: nn.Module) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
    """(out, in) -> (one eligible layer's weight of that shape, how many layers have it)."""
    found: dict[tuple[int, int], tuple[torch.Tensor, int]] = {}
    for m in model.modules():
        if _eligible(m):
            w = m.weight.detach()
            shape = (int(w.shape[0]), int(w.shape[1]))
            first, n = found.get(shape, (w, 0))
            found[shape] = (first, n + 1)
    return found


def _timings(shapes: dict[tuple[int, int], tuple[torch.Tensor, int]]) -> tuple[float, float]:
    """(training speed-up, decode speed-up) of oneDNN over torch's kernel on these weights, each
    shape's time weighted by its number of layers. Training leaves out the shapes with more
    than 8192 outputs (an output head: it runs on a step's completion tokens only, and timing it
    at TRAIN_ROWS would cost most of the measurement)."""
    gen = torch.Generator().manual_seed(0)
    t_torch = t_dnn = d_torch = d_dnn = 0.0
    with torch.no_grad():
        for (out_f, in_f), (w, n) in shapes.items():
            if out_f <= 8192:
                x = torch.randn(TRAIN_ROWS, in_f, generator=gen)
                g = torch.randn(TRAIN_ROWS, out_f, generator=gen)
                t_torch += n * _best_ms(_torch_train, x, w, g)
                t_dnn += n * _best_ms(_onednn_train, x, w, g)
            x = torch.randn(DECODE_ROWS, in_f, generator=gen)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, DECODE_ROWS)
            d_torch += n * _best_ms(F.linear, x, w)
            d_dnn += n * _best_ms(onednn_linear, x, packed)
    return (t_torch / t_dnn if t_dnn else 1.0), (d_torch / d_dnn if d_dnn else 1.0)


def _cache_file() -> Path:
    """$POSTTRAIN_KERNEL_CACHE, or kernels.json in the cache directory ($POSTTRAIN_CACHE or
    ~/.cache/posttrain)."""
    if os.environ.get("POSTTRAIN_KERNEL_CACHE"):
        return Path(os.environ["POSTTRAIN_KERNEL_CACHE"])
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(Path.home(), ".cache", "posttrain")
    return Path(root) / "kernels.json"


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_CHOICES: dict[str, KernelChoice] = {}  # this process's choices by cache key
_PRINTED: set[str] = set()  # the keys whose choice this process printed


def choices() -> dict[str, list[float]]:
    """This process's kernel choices (key -> [training, decode speed-up]), for a checkpoint: a
    resumed run takes its kernels from there (`pin`), so that it continues with the same sums."""
    return {k: [c.train_speedup, c.decode_speedup] for k, c in _CHOICES.items()}


def pin(saved: dict[str, list[float]]) -> None:
    """Take these choices (`choices()` of the run being resumed) over any measurement."""
    for key, (train, decode) in saved.items():
        _CHOICES[key] = decide(train, decode, "the resumed run's checkpoint")


def _key(model: nn.Module) -> str:
    dims = sorted(f"{o}x{i}:{n}" for (o, i), (_, n) in _shapes(model).items())
    return f"{_cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | {' '.join(dims)}"  # fmt: skip


def measure_kernels(model: nn.Module, key: str | None = None) -> KernelChoice:
    """Choose oneDNN or torch's kernel for the model's fp32 CPU linear layers by timing both on
    its weight shapes (`_timings`, well under a second for a 135M model), for training and for
    decoding. Remembered per CPU model, torch version, threads and shapes, in this process and
    in `kernels.json` of the cache directory ($POSTTRAIN_CACHE or ~/.cache/posttrain). key:
    `_key(model)` where the caller has it."""
    key = key or _key(model)
    if key in _CHOICES:
        return _CHOICES[key]
    path = _cache_file()
    try:
        saved = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        saved = {}
    entry = saved.get(key)
    if isinstance(entry, list) and len(entry) == 2:
        choice = decide(*entry, source="cached measurement")
    else:
        choice = decide(*_timings(_shapes(model)))
        saved[key] = [choice.train_speedup, choice.decode_speedup]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(saved, indent=1))
            tmp.replace(path)  # atomic: a concurrent run reads the old or the new file
        except OSError:
            pass  # a read-only cache: measure again next time
    _CHOICES[key] = choice
    return choice


def use_kernels(model: nn.Module, onednn: bool | str) -> KernelChoice | None:
    """Apply `run.onednn` to a model: True switches its fp32 CPU linear layers to oneDNN for
    training and decoding, False leaves torch's kernels, "auto" measures (`measure_kernels`) and
    switches each use where oneDNN won, printing the choice. Returns the choice ("auto" on a
    model with eligible layers) or None."""
    if onednn is True or onednn is False:
        if onednn:
            use_onednn(model)
        return None
    if onednn != "auto":
        raise ValueError(f"run.onednn must be true, false or 'auto', not {onednn!r}")
    if not available() or not any(_eligible(m) for m in model.modules()):
        return None
    key = _key(model)
    choice = measure_kernels(model, key)
    if choice.train:
        use_onednn(model)
    for m in model.modules():  # what the lean decoder reads (`decodes_onednn`)
        if _eligible(m):
            m._posttrain_decode_onednn = choice.decode  # type: ignore[attr-defined]
    if key not in _PRINTED:  # once per process and model shape
        _PRINTED.add(key)
        print(choice.describe(), flush=True)
    return choice


def _decodes(m: nn.Module) -> bool:
    """The layer's no-grad decode products run oneDNN: as `use_kernels` chose for it, or (a layer
    it never saw) where `use_onednn` switched it."""
    return bool(m.__dict__.get("_posttrain_decode_onednn", switched(m)))


def decodes_onednn(model: nn.Module) -> bool:
    """Whether decode steps of this model run oneDNN (`_decodes` of its linear layers)."""
    return any(_eligible(m) and _decodes(m) for m in model.modules())


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
