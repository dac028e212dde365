"""The shipped online-RL configs load with their command's Config, and per-command defaults differ."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.algos import grpo, reinforce
from posttrain.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize(
    "name, cls",
    [
        ("reinforce_sentiment.toml", reinforce.Config),
        ("rloo_sentiment.toml", grpo.RLOOConfig),
        ("grpo_unit_conversion.toml", grpo.GRPOConfig),
    ],
)
def test_shipped_config_loads(name, cls):
    cfg = load_config(cls, CONFIGS / name)
    assert cfg.steps > 0 and cfg.reward.components


def test_command_defaults():
    rloo, g = grpo.COMMAND_CONFIGS["rloo"](), grpo.COMMAND_CONFIGS["grpo"]()
    assert (rloo.advantage, rloo.kl_in, rloo.kl_estimator, rloo.loss_reduction) == (
        "rloo",
        "reward",
        "k1",
        "fixed",
    )
    assert (g.advantage, g.kl_in, g.kl_estimator, g.loss_reduction, g.kl_coef) == (
        "group_norm",
        "loss",
        "k3",
        "seq_mean",
        0.04,
    )


def test_bad_keys_are_errors():
    with pytest.raises(ConfigError, match="baseline"):
        load_config(reinforce.Config, None, ["--baseline=median"])
    with pytest.raises(ConfigError, match="Did you mean 'components'"):
        load_config(reinforce.Config, None, ["--reward.component=task"])


def test_help_lists_field_docs():
    from posttrain.config_text import help_text

    text = help_text(grpo.RLOOConfig, "rloo")
    assert "--samples_per_prompt" in text and "k, completions sampled per prompt" in text
    assert "--group_size -> --samples_per_prompt" in text  # the old name, still accepted
    assert "--gen.temperature" in text and "--reward.on_error" in text


ONLINE = {"reinforce": reinforce.Config, "rloo": grpo.RLOOConfig, "grpo": grpo.GRPOConfig}


@pytest.mark.parametrize("command", ["reinforce", "rloo", "grpo", "ppo"])
def test_online_commands_share_the_glossary_names(command):
    """docs/glossary.md: one name per idea in every online command; each old name maps to a
    field that exists, and is not itself a field."""
    from dataclasses import fields

    from posttrain.algos import ppo
    from posttrain.config import Renamed

    cls = ONLINE.get(command, ppo.Config)
    names = {f.name for f in fields(cls)}
    shared = {"samples_per_prompt", "kl_coef", "kl_estimator", "ref", "eval_limit", "batch_size"}
    assert shared <= names
    if command != "reinforce":  # one update per rollout: no epochs, minibatches or clip
        assert {"update_epochs", "num_minibatches", "clip_range", "loss_reduction"} <= names
    for old, new in getattr(cls, "RENAMED", {}).items():
        new = new.new if isinstance(new, Renamed) else new
        assert old not in names and new in names, (old, new)
