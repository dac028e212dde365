"""SFT data: prompt masking, chat-template masking, plain text, truncation, collation, columns."""

from __future__ import annotations

import json

import pytest

from posttrain.algos.sft import Config
from posttrain.config import ConfigError
from posttrain.data import (
    IGNORE_INDEX,
    DataConfig,
    collate_sft,
    encode_messages,
    encode_prompt_completion,
    encode_rows,
    encode_text,
    fill,
    format_number,
    load_rows,
    pick_format,
)


@pytest.fixture(scope="module")
def tok():
    from conftest import build_tokenizer

    return build_tokenizer()


def _labelled(ex):
    return [t for t in ex["labels"] if t != IGNORE_INDEX]


def test_prompt_tokens_masked_completion_and_eos_labelled(tok):
    prompt, completion = "How many grams are there per 6 kg? ", "<answer>6000</answer>"
    ex = encode_prompt_completion(tok, prompt, completion, max_length=128)
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"] == p + c
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + c
    assert not ex["truncated"]


def test_messages_only_assistant_turns_labelled(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "world"},
        {"role": "user", "content": "capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    ex = encode_messages(tok, msgs, max_length=512)
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full
    assert tok.decode(_labelled(ex)) == "world<|im_end|>\nParis<|im_end|>\n"
    # every masked token is outside the assistant contents
    masked = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX])
    assert "hello" in masked and "be brief" in masked and "Paris" not in masked


def test_messages_starting_with_assistant(tok):
    ex = encode_messages(tok, [{"role": "assistant", "content": "hello"}], max_length=64)
    assert tok.decode(ex["input_ids"]) == "<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.decode(_labelled(ex)) == "hello<|im_end|>\n"


def test_messages_without_chat_template_is_a_clear_error(tok):
    from conftest import build_tokenizer

    bare = build_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        encode_messages(bare, [{"role": "user", "content": "hi"}], max_length=64)


def test_text_every_token_labelled(tok):
    ex = encode_text(tok, "the quick brown fox", max_length=64)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_keeps_start_and_drops_examples_left_without_labels(tok):
    n_prompt = len(tok("a b c d e f g h")["input_ids"])
    ex = encode_prompt_completion(tok, "a b c d e f g h", " i j k l m n", max_length=n_prompt + 2)
    assert len(ex["input_ids"]) == n_prompt + 2 and ex["truncated"]
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == tok(" i j", add_special_tokens=False)["input_ids"][:2]

    cfg = DataConfig(max_length=n_prompt, prompt_column="p", completion_column="c")
    rows = [{"p": "a b c d e f g h", "c": " i j"}, {"p": "a", "c": " b"}]
    kept = encode_rows(rows, tok, cfg, "prompt_completion")
    assert len(kept) == 1  # the first row lost its whole completion
    with pytest.raises(ConfigError, match="max_length"):
        encode_rows(rows[:1], tok, cfg, "prompt_completion")


def test_collate_right_pads_with_masked_labels(tok):
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8], "labels": [8]}
    batch = collate_sft([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_template_fill_formats_numbers():
    row = {"question": "How many grams are there per 6 kg?", "answer": 6000.0}
    cfg = DataConfig()
    assert fill(cfg.prompt_template, row) == "How many grams are there per 6 kg? "
    assert fill(cfg.completion_template, row) == "<answer>6000</answer>"
    assert format_number(2.54) == "2.54" and format_number(1 / 3) == "0.333333"
    assert format_number(1234567.8) == "1234570"
    with pytest.raises(ConfigError, match="reasoning"):
        fill("{reasoning}", row)


def test_pick_format():
    d = DataConfig()
    assert pick_format(d, ["messages", "prompt"]) == "messages"
    assert pick_format(d, ["prompt", "completion"]) == "prompt_completion"
    assert pick_format(d, ["text"]) == "text"
    assert pick_format(d, ["question", "answer"]) == "template"


def test_load_rows_with_column_mapping_and_held_out_validation(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"question {i}", "a": f" answer {i}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = Config()
    cfg.data.source = str(path)
    cfg.data.prompt_column, cfg.data.completion_column = "q", "a"
    cfg.data.validation_size = 0.25
    train, val, fmt = load_rows(cfg)
    assert fmt == "prompt_completion"
    assert len(train) == 15 and len(val) == 5
    assert {r["q"] for r in train}.isdisjoint({r["q"] for r in val})

    cfg.data.format = "messages"
    with pytest.raises(ConfigError, match="missing column"):
        load_rows(cfg)


@pytest.mark.parametrize(
    "module,name",
    [("sft", "sft_unit_conversion"), ("rft", "rft_unit_conversion"), ("distill", "distill")],
)
def test_shipped_configs_load(module, name):
    import importlib
    from pathlib import Path

    from posttrain.config import load_config

    root = Path(__file__).resolve().parents[2]
    mod = importlib.import_module(f"posttrain.algos.{module}")
    cfg = load_config(mod.Config, root / "configs" / f"{name}.toml")
    assert cfg.model.name == "default" and cfg.lora.enabled
