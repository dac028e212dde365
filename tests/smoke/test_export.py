"""Hub-ready folders: adapter round trip, merge through the CLI, model card, push (faked hub)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.config import LoraConfig
from posttrain.export import model_card, push, save_folder

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


def _trained_adapter(tiny_dir, tmp_path):
    """A LoRA adapter with non-zero weights saved through save_folder -> (model, folder)."""
    from posttrain.models import apply_lora, load_model

    model, tok = load_model(str(tiny_dir))
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # lora_B starts at zero; make the adapter matter
    model.eval()
    folder = save_folder(
        model, tok, tmp_path / "adapter", base_model=str(tiny_dir), config_toml="[lora]\nr = 4\n",
        results={"eval_loss": 1.25, "test": {"accuracy": 0.5}},
    )  # fmt: skip
    return model, folder


def test_adapter_round_trip_gives_identical_logits(tiny_dir, tmp_path, torch_kernels):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_model

    model, folder = _trained_adapter(tiny_dir, tmp_path)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=IDS).logits
    assert not torch.allclose(want, base_logits)  # the adapter changes the output

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), folder).eval()
    ours, _ = load_model(str(folder))  # posttrain resolves the base from adapter_config.json
    from posttrain.config import ModelConfig

    named, _ = load_model(ModelConfig(name=str(tiny_dir), adapter=str(folder)))
    with torch.no_grad():
        for loaded in (plain, ours, named):
            assert torch.equal(loaded(input_ids=IDS).logits, want)


def test_merge_gives_the_adapter_models_logits(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = _trained_adapter(tiny_dir, tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", str(folder), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-4, atol=1e-5
        )
    assert "merged into its base model" in (out / "README.md").read_text()


def test_merge_rejects_a_folder_without_an_adapter(tmp_path, capsys):
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err


def test_model_card_names_base_config_and_results():
    card = model_card(
        base_model="default", kind="adapter", config_toml="[lora]\nr = 8\n",
        results={"eval_loss": 0.5, "adapter_size_mb": 9.8, "test": {"accuracy": 0.61}},
    )  # fmt: skip
    assert card.startswith(
        "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft"
    )
    assert "| eval_loss | 0.5 |" in card and "| test accuracy | 0.61 |" in card
    assert "```toml\n[lora]\nr = 8\n```" in card
    # a local base model is named in the text, never as hub metadata
    local = model_card(base_model="/tmp/some/model", kind="model")
    assert "base_model:" not in local and "/tmp/some/model" in local


def test_push_uploads_the_folder(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):
            calls.append(("upload", kw["repo_id"], kw))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    _, folder = _trained_adapter(tiny_dir, tmp_path)
    assert main(["push", str(folder), "--repo-id", "me/units", "--private"]) == 0
    assert calls[0][0] == "create" and calls[0][2]["private"] is True
    assert calls[1][0] == "upload" and calls[1][2]["folder_path"] == str(folder)
    assert main(["push", str(folder)]) == 2  # --repo-id is required (argparse's exit code)

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="hf auth login"):
        push(folder, "me/units")
    with pytest.raises(ConfigError, match="neither config.json"):
        push(tmp_path, "me/units")
    with pytest.raises(ConfigError, match="user/name"):
        push(folder, "units")
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
