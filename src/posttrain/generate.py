"""`posttrain generate`: sample completions for prompts given as arguments, a file or a dataset.

posttrain generate --model default --prompt "Name three colours." --chat
posttrain generate --input prompts.txt --output out.jsonl --gen.temperature=0.7 --gen.n=4
posttrain generate --input reviews.csv --column text --limit 100 --gen.max_new_tokens=20
posttrain generate --prompt "What is 37 * 1.609344? " --tool calculator

With tools, each record also lists the calls its completion made ("tool_calls").
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from posttrain.config import ConfigError, ModelConfig, check
from posttrain.rollout import GenerationConfig
from posttrain.tools import Toolbox, ToolConfig


def _greedy() -> GenerationConfig:
    return GenerationConfig(temperature=0.0, max_new_tokens=128)


@dataclass
class Config:
    ALIASES: ClassVar[dict[str, str]] = {
        "model": "model.name",
        "adapter": "model.adapter",
        "prompt": "prompts",
        "chat": "gen.chat",
        "system": "gen.system_prompt",
        "temperature": "gen.temperature",
        "max-new-tokens": "gen.max_new_tokens",
        "n": "gen.n",
        "tool": "tools.names",
    }
    prompts: list[str] = field(default_factory=list)
    """prompts given on the command line (repeat --prompt for several)"""
    input: str | None = None
    """a .txt file (one prompt per line), a .jsonl/.json/.csv/.parquet file, or a hub dataset name"""
    column: str = "prompt"
    """column (or JSON field) holding the prompt in --input"""
    split: str = "train"
    """dataset split for --input"""
    limit: int = check(0, ">= 0")
    """use only the first N prompts (0: all)"""
    output: str | None = None
    """write JSONL records here instead of printing"""
    seed: int = 0
    """random seed for sampling"""
    progress: bool = True
    """show a progress bar"""
    threads: int = check(0, ">= 0")
    """torch CPU threads (0: torch's default); training commands and eval call it --run.threads"""
    model: ModelConfig = field(default_factory=ModelConfig)
    gen: GenerationConfig = field(default_factory=_greedy)
    tools: ToolConfig = field(default_factory=ToolConfig)


def read_prompts(cfg: Config) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.input:
        path = Path(cfg.input)
        if path.suffix == ".txt":
            if not path.is_file():
                raise ConfigError(f"--input file {cfg.input!r} not found")
            prompts += [line for line in path.read_text().splitlines() if line.strip()]
        else:
            from posttrain.data import load_table

            rows = load_table(cfg.input, split=cfg.split)
            if cfg.column not in rows.column_names:
                raise ConfigError(
                    f"--input {cfg.input!r} has no column {cfg.column!r}; its columns are "
                    f"{', '.join(rows.column_names)} (choose one with --column)"
                )
            prompts += [str(x) for x in rows[cfg.column]]
    if cfg.limit:
        prompts = prompts[: cfg.limit]
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --input FILE")
    return prompts


def main(cfg: Config) -> int:
    from posttrain.models import load_model
    from posttrain.rollout import generate
    from posttrain.runs import seed_everything

    prompts = read_prompts(cfg)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, tok = load_model(cfg.model, onednn="auto")
    show = cfg.progress and (len(prompts) * cfg.gen.n > 8 or cfg.output is not None)
    tools = Toolbox.from_config(cfg.tools)
    roll = generate(model, tok, prompts, cfg.gen, progress=show, tools=tools)
    out = open(cfg.output, "w") if cfg.output else None  # noqa: SIM115
    try:
        for i, text in enumerate(roll.completions):
            rec = {
                "prompt": prompts[int(roll.prompt_index[i])],
                "sample": i % cfg.gen.n,
                "completion": text,
                "finish_reason": roll.finish_reasons[i],
                "tokens": int(roll.completion_mask[i].sum()),
            }
            if tools is not None:
                rec["tool_calls"] = roll.tool_records(i)
            if out:
                out.write(json.dumps(rec) + "\n")
            elif len(prompts) == 1 and cfg.gen.n == 1:
                print(text)
            else:
                print(json.dumps(rec))
    finally:
        if out:
            out.close()
    tps = roll.num_tokens / max(roll.seconds, 1e-9)
    print(f"{len(roll)} completions, {roll.num_tokens} tokens, {tps:.1f} tokens/s", file=sys.stderr)
    return 0
