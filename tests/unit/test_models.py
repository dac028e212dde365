"""Model loading: local directories, GGUF, errors, LoRA helpers."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import LoraConfig
from posttrain.models import ModelLoadError, adapter_disabled, apply_lora, load_model, resolve


def test_local_dir_loads_in_eval_fp32(tiny_dir):
    model, tok = load_model(str(tiny_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token_id is not None


def test_missing_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve("./does/not/exist")


def test_remote_code_needs_flag(tiny_dir, tmp_path):
    import shutil

    dst = tmp_path / "remote"
    shutil.copytree(tiny_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(str(dst))


def test_adapter_disabled_equals_base(tiny):
    model, tok = tiny
    ids = tok(["hello world"], return_tensors="pt")
    with torch.no_grad():
        base = model(**ids).logits
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    # make the adapter non-trivial
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    with torch.no_grad():
        adapted = peft_model(**ids).logits
        with adapter_disabled(peft_model) as m:
            off = m(**ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(off, base, atol=0, rtol=0)
