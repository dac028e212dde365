"""Renamed config keys (docs/glossary.md): an old name still works in a TOML file and on the
command line, moves across sections (`[kl] coef` -> `kl_coef`), and prints one note per old name
to stderr, a line for the user rather than a Python warning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from posttrain.config import ConfigError, OptimConfig, Renamed, load_config
from posttrain.config_text import help_text


@dataclass
class Cfg:
    RENAMED: ClassVar[dict[str, Any]] = {
        "cliprange": "clip_range",
        "kl.coef": "kl_coef",
        "opt.rate": "optim.lr",
        "rows_each": Renamed(
            "parts", lambda cfg, size: cfg.rows // size, hint="= rows / rows_each"
        ),
    }
    clip_range: float = 0.2
    """ratio clip"""
    kl_coef: float = 0.1
    """KL coefficient"""
    rows: int = 8
    """rows"""
    parts: int = 1
    """parts"""
    optim: OptimConfig = field(default_factory=OptimConfig)


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_old_name_in_toml_and_on_the_command_line_works_and_notes_once(tmp_path, capsys):
    path = _toml(tmp_path, "cliprange = 0.3\n\n[kl]\ncoef = 0.5\n\n[opt]\nrate = 1e-3\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a printed note, never a Python warning
        cfg = load_config(Cfg, path, ["--cliprange=0.4"])
    assert (cfg.clip_range, cfg.kl_coef, cfg.optim.lr) == (0.4, 0.5, 1e-3)  # the CLI wins
    err = capsys.readouterr().err.splitlines()
    assert err.count("posttrain: 'cliprange' is now 'clip_range'; the old name still works") == 1
    assert "posttrain: 'kl.coef' is now 'kl_coef'; the old name still works" in err
    assert "posttrain: 'opt.rate' is now 'optim.lr'; the old name still works" in err
    assert len(err) == 3


def test_new_names_print_nothing(tmp_path, capsys):
    cfg = load_config(Cfg, _toml(tmp_path, "clip_range = 0.3\n"), ["--kl_coef=0.2"])
    assert (cfg.clip_range, cfg.kl_coef) == (0.3, 0.2)
    assert capsys.readouterr().err == ""


def test_old_and_new_name_in_one_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'cliprange' and 'clip_range' are one key"):
        load_config(Cfg, _toml(tmp_path, "cliprange = 0.3\nclip_range = 0.1\n"))


def test_a_renamed_section_key_left_alone_is_still_unknown(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'kl'"):
        load_config(Cfg, _toml(tmp_path, "[kl]\ncoef = 0.5\ntarget = 3\n"))


def test_converted_old_name_reads_the_final_values(tmp_path, capsys):
    """rows_each = 2 with rows = 12 set after it -> parts = 6; the new name on the command line
    wins over the old one in the file."""
    cfg = load_config(Cfg, _toml(tmp_path, "rows_each = 2\n"), ["--rows=12"])
    assert cfg.parts == 6
    assert "'rows_each' is now 'parts' (= rows / rows_each)" in capsys.readouterr().err
    assert load_config(Cfg, _toml(tmp_path, "rows_each = 2\n"), ["--parts=3"]).parts == 3
    assert load_config(Cfg, None, ["--rows_each", "4"]).parts == 2


def test_help_lists_old_names():
    assert "old names, still accepted: --cliprange -> --clip_range" in help_text(Cfg, "x")


def test_shipped_ppo_config_with_old_names_still_loads(tmp_path, capsys):
    """The ppo_summarization.toml shipped before the glossary: every old name, same values."""
    from posttrain.algos import ppo

    old = """
steps = 30
batch_size = 8
mini_batch_size = 4
ppo_epochs = 4
cliprange = 0.2
cliprange_value = 0.2

[kl]
coef = 0.2
controller = "adaptive"
target = 6.0
horizon = 10000
"""
    cfg = load_config(ppo.Config, _toml(tmp_path, old), ["--kl.coef=0.3"])
    assert (cfg.num_minibatches, cfg.update_epochs, cfg.clip_range, cfg.kl_coef) == (2, 4, 0.2, 0.3)
    assert (cfg.kl_controller, cfg.kl_target, cfg.kl_horizon) == ("adaptive", 6.0, 10000)
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 8
        and err.count("posttrain: 'kl.coef' is now 'kl_coef'; the old name still works") == 1
    )


def test_grpo_old_names_on_the_command_line():
    from posttrain.algos import grpo

    argv = ["--group_size=3", "--inner_epochs=2", "--clip_eps=0.1", "--clip_eps_high=0.3"]
    cfg = load_config(grpo.GRPOConfig, None, argv)
    assert (cfg.samples_per_prompt, cfg.update_epochs) == (3, 2)
    assert (cfg.clip_range, cfg.clip_range_high) == (0.1, 0.3)
    with pytest.raises(ConfigError, match="^samples_per_prompt must be >= 2, got 1$"):
        load_config(grpo.RLOOConfig, None, ["--group_size=1"])


def test_shipped_configs_use_the_new_names(capsys):
    """Every configs/*.toml loads without a note: the shipped recipes are written in the
    glossary's names."""
    import importlib

    from posttrain.cli import COMMANDS

    root = Path(__file__).resolve().parents[2] / "configs"
    for path in sorted(root.glob("*.toml")):
        command = next(c for c in sorted(COMMANDS, key=len, reverse=True)
                       if path.stem.startswith(c.replace("-", "_")))  # fmt: skip
        module = importlib.import_module(COMMANDS[command][0])
        cls = getattr(module, "COMMAND_CONFIGS", {}).get(command, getattr(module, "Config", None))
        load_config(cls, path)
        assert capsys.readouterr().err == "", path.name
