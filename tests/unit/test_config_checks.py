"""Range rules as field metadata (`config.check`): parsed once, checked by `load_config`."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

import pytest

from posttrain.cli import COMMANDS
from posttrain.config import ConfigError, OptimConfig, RunConfig, check, check_config, load_config


@dataclass
class Cfg:
    batch_size: int = check(4, ">= 1")
    """rows"""
    mini_batch_size: int = check(2, ">= 1 and <= batch_size")
    """rows per step"""
    frac: float = check(0.5, "in [0, 1]")
    """a fraction"""
    top_p: float | None = check(None, "in (0, 1]")
    """optional"""
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optim.lr=-1", "optim.lr must be > 0, got -1.0"),
        (
            "--batch_size=0",
            "batch_size must be >= 1, got 0; "
            "mini_batch_size must be >= 1 and <= batch_size (0), got 2",
        ),
        ("--mini_batch_size=5", "mini_batch_size must be >= 1 and <= batch_size (4), got 5"),
        ("--frac=1.5", "frac must be in [0, 1], got 1.5"),
        ("--top_p=0", "top_p must be in (0, 1], got 0.0"),
        ("--optim.betas=[0.9, 1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
        ("--optim.grad_accum=0", "optim.grad_accum must be >= 1, got 0"),
    ],
)
def test_a_broken_rule_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, [override])
    assert str(e.value) == message


def test_every_broken_rule_is_listed_on_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, None, ["--batch_size=0", "--frac=-1"])
    assert "\n" not in str(e.value)
    assert "batch_size must be >= 1" in str(e.value) and "frac must be in [0, 1]" in str(e.value)


def test_in_range_values_and_none_pass():
    cfg = load_config(Cfg, None, ["--frac=0", "--frac=1", "--top_p=1", "--mini_batch_size=4"])
    assert cfg.frac == 1.0 and cfg.top_p == 1.0


def test_resume_must_be_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="run.resume must be a run directory.*does not exist"):
        load_config(Cfg, None, [f"--run.resume={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="run.resume must be a run directory.*no config.toml"):
        load_config(Cfg, None, [f"--run.resume={tmp_path}"])
    (tmp_path / "config.toml").write_text("")
    assert load_config(Cfg, None, [f"--run.resume={tmp_path}"]).run.resume == str(tmp_path)


def test_a_bad_rule_fails_when_the_class_is_defined():
    with pytest.raises(ValueError, match="bad check rule"):
        check(1, "at least one")


def test_help_shows_the_rule():
    from posttrain.config_text import help_text

    assert "--batch_size  (int, default 4, must be >= 1)" in help_text(Cfg)


def test_python_configs_are_checked_too():
    cfg = Cfg()
    cfg.optim.lr = 0.0
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        check_config(cfg)


def _config_classes():
    for command, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        cls = getattr(mod, "COMMAND_CONFIGS", {}).get(command, getattr(mod, "Config", None))
        if cls is not None:
            yield command, cls


def test_every_command_default_passes_its_rules():
    for _, cls in _config_classes():
        check_config(cls())


def test_sizes_of_every_training_command_have_a_rule():
    """Every command's sizes carry a rule: no command checks them in its own code."""
    sizes = {"batch_size", "steps", "epochs", "samples_per_prompt", "num_minibatches", "k"}
    for command, cls in _config_classes():
        for f in dataclasses.fields(cls):
            if f.name in sizes:
                assert f.metadata.get("check"), f"{command}: {f.name} has no rule"
    from posttrain.algos.grpo import GRPOConfig, RLOOConfig

    for cls in (GRPOConfig, RLOOConfig):
        rule = {f.name: f.metadata.get("check") for f in dataclasses.fields(cls)}
        assert rule["samples_per_prompt"] == ">= 2" and rule["kl_coef"] == ">= 0"
