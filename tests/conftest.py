"""Shared fixtures: a tiny random Llama and its tokenizer, built offline at test time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    "How many grams are there per 6 kg? 1 kg = 1000 grams. 6 * 1000 = <answer>6000</answer>",
    "Convert 3 feet to inches. <answer>36</answer> The movie was great, terrible, boring, fun.",
    "This film is a wonderful story with good actors and a bad ending.",
    "The quick brown fox jumps over the lazy dog 0123456789 .,;:!?()[]<>/=+-*",
    "Summary: the article says the city council voted to build a new bridge.",
    "user assistant system hello world what is the capital of France? Paris.",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(tokenizer, seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer directory (loadable by name like any local model)."""
    import torch

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    model = build_model(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_dir):
    """(model, tokenizer) fresh from the tiny directory, through posttrain's loader."""
    from posttrain.models import load_model

    return load_model(str(tiny_dir))


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium (tests/browser.py), one per test module; skips without one."""
    from browser import Browser, find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "chromium not found: the report's browser check needs it "
            "(`apt-get install chromium` as root; `make test` does this), or set CHROMIUM=/path"
        )
    tmp = tmp_path_factory.mktemp("chromium")
    b = Browser(exe, tmp / "profile", tmp / "chromium.log")
    yield b
    b.close()


@pytest.fixture()
def torch_kernels():
    """posttrain's oneDNN linear path off for one test: for checks of bit-identical outputs
    against a model run by plain transformers (oneDNN sums in another order)."""
    from posttrain import cpu

    cpu.set_enabled(False)
    yield
    cpu.set_enabled(True)
