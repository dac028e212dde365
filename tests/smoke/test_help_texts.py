"""#17's small ones: --help shows choices and defaults; error messages read as English."""

from __future__ import annotations

import pytest

from posttrain.cli import main


def test_dpo_help_lists_the_loss_types(capsys):
    assert main(["dpo", "--help"]) == 0
    assert (
        "--loss_type  ('dpo' | 'ipo' | 'cdpo' | 'simpo', default 'dpo')" in capsys.readouterr().out
    )


def test_merge_help_gives_the_dtype_default(capsys):
    assert main(["merge", "--help"]) == 0
    assert "(default: float32)" in capsys.readouterr().out


def test_report_help_documents_the_plots_folder(capsys):
    with pytest.raises(SystemExit):  # argparse's --help exit, as `posttrain report --help` does
        main(["report", "--help"])
    assert "X_plots/" in " ".join(capsys.readouterr().out.split())


def test_reward_model_from_an_adapter_says_a_lora_adapter(tmp_path):
    from posttrain.algos.reward_model import load_reward_model
    from posttrain.config import LoraConfig, ModelConfig
    from posttrain.models import ModelLoadError

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a LoRA adapter"):
        load_reward_model(ModelConfig(name=str(tmp_path)), LoraConfig(), "cpu")
