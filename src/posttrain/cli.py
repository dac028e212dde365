"""`posttrain <command> [--config FILE.toml] [--section.key=value ...]`.

Each command is a module with a `Config` dataclass and a `main(cfg)`; the module is imported only
when its command runs, so `posttrain --help` stays fast. A config or model error is one line on
stderr and exit code 2, with no traceback.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys

# command -> (module, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": (
        "posttrain.generate",
        "sample completions for prompts (batched, chat or raw text)",
    ),
    "eval": ("posttrain.evaluate", "evaluate models and prompting strategies on a task"),
    "sft": ("posttrain.algos.sft", "supervised fine-tuning, full or LoRA, prompt tokens masked"),
    "rft": ("posttrain.algos.rft", "rejection-sampling fine-tuning (Yuan et al. 2023)"),
    "distill": ("posttrain.algos.distill", "knowledge distillation from a teacher's distributions"),
    "reinforce": ("posttrain.algos.reinforce", "REINFORCE with a baseline and a KL penalty"),
    "rloo": ("posttrain.algos.grpo", "RLOO: k samples per prompt, leave-one-out advantages"),
    "grpo": ("posttrain.algos.grpo", "GRPO: group-normalised advantages, clipped ratio"),
    "ppo": ("posttrain.algos.ppo", "PPO with a value head, GAE and an adaptive KL controller"),
    "dpo": ("posttrain.algos.dpo", "direct preference optimisation (and IPO, cDPO)"),
    "reward-model": ("posttrain.algos.reward_model", "train a Bradley-Terry reward model on pairs"),
    "report": ("posttrain.report", "build an HTML report (plots, samples) for a run directory"),
    "compare": ("posttrain.compare", "compare several runs on the same axes"),
    "merge": ("posttrain.export", "merge a LoRA adapter into its base model"),
    "push": ("posttrain.export", "upload a saved model or adapter folder to the hub"),
    "demo": ("posttrain.demo", "the end-to-end pipeline on the embedded default model"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = [
        "usage: posttrain <command> [--config FILE.toml] [--section.key=value ...]",
        "",
        "commands:",
    ]
    lines += [f"  {c:<{width}}  {desc}" for c, (_, desc) in COMMANDS.items()]
    lines += ["", "`posttrain <command> --help` lists every option with its default."]
    return "\n".join(lines)


def run_command(command: str, argv: list[str]) -> int:
    """Parse `argv` into the command's Config and call its main."""
    from posttrain.config import ConfigError, load_config
    from posttrain.config_text import help_text

    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, "cli", None)
    if entry is not None:  # commands with positional arguments (report, merge, push)
        return int(entry(command, argv) or 0)
    cls = getattr(module, "COMMAND_CONFIGS", {}).get(command, getattr(module, "Config", None))
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, command))
        return 0
    config_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a TOML file path")
            config_path = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            config_path = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    cfg = load_config(cls, config_path, rest)
    result = module.main(cfg)  # main applies cfg.run's CPU settings (train.uses_run_settings)
    return int(result) if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from posttrain import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"posttrain: unknown command '{command}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    if not _AT_EXIT:
        atexit.register(_close_process_group)
        _AT_EXIT.append(True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # datasets' "Generating train split" bars for a local jsonl file say nothing to a user
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from posttrain.config import ConfigError
    from posttrain.models import ModelLoadError

    try:
        return run_command(command, rest)
    except (ConfigError, ModelLoadError) as e:
        print(f"posttrain {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"posttrain {command}: interrupted", file=sys.stderr)
        return 130


_AT_EXIT: list[bool] = []  # whether _close_process_group is registered with atexit


def _close_process_group() -> None:
    """At exit, shut down torch.distributed's process group (under `accelerate launch`): a gloo
    group left to the interpreter's teardown can abort a process that finished its work
    ("terminate called without an active exception"). Registered with atexit, so that several
    commands in one process share the group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        # Sharded models hold the group: collect them now, or the group's C++ side dies in the
        # interpreter's teardown, where its threads abort the process (the FSDP CPU worker: 4 of
        # 36 runs with barrier + destroy alone, 0 of 60 with the collect first).
        gc.collect()
        try:  # every rank done with gloo before any tears it down
            dist.barrier()
        except RuntimeError:  # a rank that died already: nothing to wait for
            pass
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
