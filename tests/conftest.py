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


# ---------------------------------------------------------------------------------------------
# Deprecations (#16): a DeprecationWarning or FutureWarning that a dependency raises while
# posttrain's code is on the stack fails the test, so posttrain moves off an API before the
# release that removes it. Not counted: warnings posttrain raises itself (its renamed config keys
# print a note instead: tests/unit/test_config_renamed.py), warnings with no posttrain frame on the
# stack (test code, fixtures of other libraries), and the third-party warnings listed here, which
# a dependency raises about its own internals and posttrain cannot fix.

THIRD_PARTY_DEPRECATIONS: list[tuple[type[Warning], str, str]] = [
    (
        FutureWarning,
        r"`is_gradient_checkpointing` is deprecated",
        "peft 0.21 reads transformers 5's deprecated attribute on every forward of a LoRA model",
    ),
]
_SRC = str(Path(__file__).resolve().parents[1] / "src" / "posttrain") + os.sep


def _posttrain_deprecation(category: type[Warning], message: str) -> str | None:
    """Where posttrain called into the dependency that warned, or None if not counted."""
    import re
    import traceback

    if not issubclass(category, DeprecationWarning | FutureWarning):
        return None
    if any(
        issubclass(category, c) and re.search(m, message) for c, m, _ in THIRD_PARTY_DEPRECATIONS
    ):
        return None
    frames = [f for f in traceback.extract_stack() if "/warnings.py" not in f.filename]
    frames = frames[:-2]  # this function and the hook's showwarning
    if not frames or frames[-1].filename.startswith(_SRC):
        return None  # no stack, or posttrain's own warning to its users
    ours = [f for f in frames if f.filename.startswith(_SRC)]
    if not ours:
        return None
    return f"{ours[-1].filename.removeprefix(_SRC)}:{ours[-1].lineno}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    import warnings

    caught: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always", DeprecationWarning)
        warnings.simplefilter("always", FutureWarning)
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            where = _posttrain_deprecation(category, str(message))
            if where is None:
                previous(message, category, filename, lineno, file, line)
            elif len(caught) < 5:
                caught.append(f"{category.__name__} via posttrain/{where}: {message}")

        warnings.showwarning = show
        result = yield  # a failing test raises here and is reported as it is
    if caught:
        if os.environ.get("POSTTRAIN_DEPRECATIONS") == "report":  # list them, fail nothing
            print("\nDEPRECATIONS " + item.nodeid + "\n  " + "\n  ".join(caught))
            return result
        pytest.fail("posttrain calls a deprecated API:\n  " + "\n  ".join(caught), pytrace=False)
    return result


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


@pytest.fixture(autouse=True, scope="session")
def _kernel_choices_in_tmp(tmp_path_factory):
    """run.onednn=auto keeps its measurements in the session's tmp directory, not in the user's
    cache (the tiny models' shapes would fill it); commands run in subprocesses share it."""
    path = tmp_path_factory.mktemp("kernels") / "kernels.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POSTTRAIN_KERNEL_CACHE", str(path))
        yield


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
def torch_kernels(monkeypatch):
    """No layer switched to oneDNN for one test, whatever run.onednn says: for checks of
    bit-identical outputs against a model run by plain transformers (oneDNN sums in another
    order)."""
    from posttrain import cpu

    monkeypatch.setattr(cpu, "available", lambda: False)
