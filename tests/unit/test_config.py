"""Config: TOML loading, dotted overrides, type coercion, clear errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from posttrain.config import ConfigError, ModelConfig, OptimConfig, load_config
from posttrain.config_text import field_docs, help_text, to_toml


@dataclass
class Cfg:
    ALIASES: ClassVar[dict[str, str]] = {"model": "model.name"}
    beta: float = 0.1
    """the KL coefficient"""
    steps: int = 10
    """number of steps"""
    mode: Literal["a", "b"] = "a"
    """a mode"""
    tags: list[str] = field(default_factory=list)
    """tags"""
    note: str | None = None
    """an optional note"""
    stops: list[str] | None = None
    """optional strings"""
    flag: bool = False
    """a flag"""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_overrides_and_types():
    cfg = load_config(
        Cfg, None, ["--beta=0.5", "--steps", "3", "--optim.lr=1e-5", "--flag", "--model", "x"]
    )
    assert cfg.beta == 0.5 and cfg.steps == 3 and cfg.optim.lr == 1e-5 and cfg.flag is True
    assert cfg.model.name == "x"
    cfg = load_config(
        Cfg, None, ["--tags", "a, b", "--tags", "c", "--note=none", "--optim.betas=[0.9, 0.95]"]
    )
    assert cfg.tags == ["a, b", "c"] and cfg.note is None and cfg.optim.betas == [0.9, 0.95]
    cfg = load_config(Cfg, None, ["--stops", "a, b", "--stops", "\n"])
    assert cfg.stops == ["a, b", "\n"]
    assert load_config(Cfg, None, ["--stops=none"]).stops is None


def test_toml_roundtrip(tmp_path):
    cfg = load_config(Cfg, None, ["--beta=0.25", "--mode=b", "--tags=x", "--optim.lr=3e-4"])
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    again = load_config(Cfg, p)
    assert again == cfg


def test_unknown_key_lists_valid_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'lr'.*warmup_steps"
    ):
        load_config(Cfg, None, ["--optim.lrr=1"])
    p = tmp_path / "bad.toml"
    p.write_text("bta = 0.3\n")
    with pytest.raises(ConfigError, match="unknown config key 'bta'.*beta"):
        load_config(Cfg, p)
    with pytest.raises(ConfigError, match="unknown config key 'nosection'"):
        load_config(Cfg, None, ["--nosection.x=1"])


def test_bad_values():
    with pytest.raises(ConfigError, match="'steps'.*not a valid int"):
        load_config(Cfg, None, ["--steps=1.5"])
    with pytest.raises(ConfigError, match="'mode'.*not one of 'a', 'b'"):
        load_config(Cfg, None, ["--mode=c"])
    with pytest.raises(ConfigError, match="'flag'"):
        load_config(Cfg, None, ["--flag=maybe"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write("beta = = 1")
        load_config(Cfg, f.name)


def test_docs_and_help():
    docs = field_docs(Cfg)
    assert docs["beta"] == "the KL coefficient"
    text = help_text(Cfg, "x")
    assert "--optim.lr" in text and "peak learning rate" in text and "--beta" in text
