"""Preference records: column mapping, conversational records, validation, tokenization with the
prompt masked, batch layout, the step-based data cursor, and building pairs from a reward."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.pair_building import build_pairs
from posttrain.preferences import (
    PairsConfig,
    collate_pairs,
    collate_sequences,
    load_records,
    normalize_record,
    record_problem,
    split_records,
    tokenize_pairs,
)
from posttrain.rollout import GenerationConfig


def test_column_mapping_from_a_file(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("q,good,bad\nThe movie was, great, dull\nA film, fun, boring\n")
    cfg = PairsConfig(prompt_column="q", chosen_column="good", rejected_column="bad")
    recs = load_records(cfg, str(path))
    assert recs[0] == {"prompt": "The movie was", "chosen": " great", "rejected": " dull"}
    with pytest.raises(ConfigError, match="no column 'prompt'"):
        load_records(PairsConfig(), str(path))


def test_conversational_records():
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": {"role": "assistant", "content": "Go away."},
    }
    rec = normalize_record(row, PairsConfig())
    assert rec == {"prompt": row["prompt"], "chosen": "Hello!", "rejected": "Go away."}
    two_turns = dict(row, chosen=[row["chosen"][0], row["chosen"][0]])
    with pytest.raises(ConfigError, match="multi-turn"):
        normalize_record(two_turns, PairsConfig())


@pytest.mark.parametrize(
    "rec, problem",
    [
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty prompt"),
        (
            {"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"},
            "empty prompt",
        ),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": "  "}, "empty rejected"),
        ({"prompt": "p", "chosen": " same", "rejected": "same "}, "chosen == rejected"),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
    ],
)
def test_record_problems(rec, problem):
    assert record_problem(rec) == problem


def test_invalid_records_error_or_drop(tiny):
    _, tok = tiny
    recs = [
        {"prompt": "The movie was", "chosen": " great", "rejected": " bad"},
        {"prompt": "The movie was", "chosen": " great", "rejected": " great"},
        {"prompt": "The movie was " * 40, "chosen": " great", "rejected": " bad"},
        {"prompt": "The film", "chosen": "", "rejected": " bad"},
    ]
    with pytest.raises(ConfigError, match="record 1: chosen == rejected.*on_invalid=drop"):
        tokenize_pairs(tok, recs, PairsConfig(max_prompt_tokens=32))
    items, counts = tokenize_pairs(tok, recs, PairsConfig(max_prompt_tokens=32, on_invalid="drop"))
    assert [it["index"] for it in items] == [0]
    assert counts == {
        "dropped: chosen == rejected": 1,
        "dropped: prompt longer than 32 tokens": 1,
        "dropped: empty chosen": 1,
    }
    with pytest.raises(ConfigError, match="no valid preference pairs"):
        tokenize_pairs(tok, recs[1:], PairsConfig(max_prompt_tokens=32, on_invalid="drop"))


def test_errors_name_the_record_of_the_file(tiny, tmp_path):
    """The bad row is row 6 of the file; holding out prompts moves it in the train list, and
    the error still names record 6."""
    from posttrain.algos.dpo import Config

    _, tok = tiny
    rows = [
        {"prompt": f"The movie {i} was", "chosen": " great", "rejected": " bad"} for i in range(10)
    ]
    rows[6]["rejected"] = " great"
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config()
    cfg.data.source, cfg.data.eval_fraction = str(path), 0.5
    from posttrain.pair_building import pair_records

    train, held = pair_records(cfg, tmp_path)
    bad = train if any(r["rejected"] == r["chosen"] for r in train) else held
    assert bad.index(next(r for r in bad if r["rejected"] == r["chosen"])) != 6
    with pytest.raises(ConfigError, match="record 6: chosen == rejected"):
        tokenize_pairs(tok, bad, cfg.data)


def test_tokenization_text_and_chat(tiny):
    _, tok = tiny
    rec = {"prompt": "The movie was", "chosen": " great fun", "rejected": " bad"}
    (item,), _ = tokenize_pairs(tok, [rec], PairsConfig())
    assert item["prompt_ids"] == tok("The movie was")["input_ids"]
    assert item["chosen_ids"] == tok(" great fun", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    # chat: the prompt is templated with the generation prompt; completions are not
    msgs = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": "No"}
    (item,), _ = tokenize_pairs(tok, [msgs], PairsConfig())
    prompt = tok.decode(item["prompt_ids"])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(item["chosen_ids"]) == "Hello<|im_end|>"
    # a string prompt with data.chat=true goes through the template too
    (item2,), _ = tokenize_pairs(tok, [dict(msgs, prompt="Hi")], PairsConfig(chat=True))
    assert item2["prompt_ids"] == item["prompt_ids"]


def test_long_completions_are_truncated_and_counted(tiny):
    """A cut completion keeps its first tokens and gets no EOS: the text did not end there, so
    the model must not learn to stop there. A whole completion still ends with EOS."""
    _, tok = tiny
    rec = {"prompt": "The movie", "chosen": " great fun" * 20, "rejected": " bad"}
    (item,), counts = tokenize_pairs(tok, [rec], PairsConfig(max_completion_tokens=8))
    whole = tok(rec["chosen"], add_special_tokens=False)["input_ids"]
    assert item["chosen_ids"] == whole[:8] and tok.eos_token_id not in item["chosen_ids"]
    assert item["rejected_ids"][-1] == tok.eos_token_id
    assert counts == {"truncated chosen": 1}


def test_joined_tokenization_with_a_scoring_suffix(tiny):
    """Reward model: prompt + completion + suffix as one string; truncation keeps the suffix."""
    _, tok = tiny
    sfx = " Verdict:"
    sfx_ids = tok(sfx, add_special_tokens=False)["input_ids"]
    rec = {"prompt": "The movie", "chosen": " great fun", "rejected": " bad"}
    (item,), _ = tokenize_pairs(tok, [rec], PairsConfig(), joined=True, suffix=sfx)
    assert item["chosen_ids"] == tok("The movie great fun Verdict:")["input_ids"]
    assert item["rejected_ids"][-len(sfx_ids) :] == sfx_ids
    cfg = PairsConfig(max_prompt_tokens=16, max_completion_tokens=8)
    long = dict(rec, chosen=" great fun" * 20)
    (item,), counts = tokenize_pairs(tok, [long], cfg, joined=True, suffix=sfx)
    assert counts == {"truncated chosen": 1}
    assert len(item["chosen_ids"]) == 24 + len(sfx_ids)
    assert item["chosen_ids"][-len(sfx_ids) :] == sfx_ids


def test_joined_truncation_with_a_suffix_keeps_the_end_as_the_reward_scores_it(tiny):
    """A reward model with a scoring suffix reads its score after the suffix, and the `model:`
    reward (rewards.ClassifierScorer) cuts a long text on the left: training must see the same
    end of the text, not its start."""
    _, tok = tiny
    sfx = " Verdict:"
    cfg = PairsConfig(max_prompt_tokens=16, max_completion_tokens=8)
    rec = {"prompt": "The movie", "chosen": " great fun" * 20 + " the end", "rejected": " bad"}
    (item,), _ = tokenize_pairs(tok, [rec], cfg, joined=True, suffix=sfx)
    whole = tok(rec["prompt"] + rec["chosen"] + sfx)["input_ids"]
    assert item["chosen_ids"] == whole[-len(item["chosen_ids"]) :]
    tok.truncation_side = "left"  # what ClassifierScorer sets for a model with a suffix
    n = len(item["chosen_ids"])  # the budget (16 + 8) and the suffix's tokens
    scored = tok(rec["prompt"] + rec["chosen"] + sfx, truncation=True, max_length=n)
    tok.truncation_side = "right"
    assert scored["input_ids"] == item["chosen_ids"]


def test_collate_pairs_layout():
    """Chosen rows then rejected rows; prompts left-padded to P, completions right-padded to T."""
    items = [
        {"index": 0, "prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]},
        {"index": 1, "prompt_ids": [11], "chosen_ids": [12, 13], "rejected_ids": [14]},
    ]
    b = collate_pairs(items, pad_id=0)
    assert b.input_ids.tolist() == [
        [5, 6, 7, 0, 0],
        [0, 11, 12, 13, 0],
        [5, 6, 8, 9, 10],
        [0, 11, 14, 0, 0],
    ]
    assert b.attention_mask.tolist() == [
        [1, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
        [0, 1, 1, 0, 0],
    ]
    assert b.mask.tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b.num_pairs == 2 and b.n_completion == 3 and b.index == [0, 1]
    ids, attn = collate_sequences(items, pad_id=0)
    assert ids.tolist()[0] == [0, 0, 5, 6, 7] and ids.tolist()[2] == [5, 6, 8, 9, 10]
    ids, _ = collate_sequences(items, pad_id=0, left=False)
    assert ids.tolist()[0] == [5, 6, 7, 0, 0]


def test_split_is_seeded_and_disjoint():
    recs = [{"prompt": str(i), "chosen": "a", "rejected": "b"} for i in range(20)]
    train, held = split_records(recs, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18
    assert {r["prompt"] for r in train} | {r["prompt"] for r in held} == {str(i) for i in range(20)}
    assert split_records(recs, 0.1, seed=3) == (train, held)
    assert split_records(recs, 0.0, seed=3) == (recs, [])


def test_split_holds_out_whole_prompts():
    """Three pairs per prompt: held-out prompts keep all their pairs out of training."""
    recs = [
        {"prompt": f"p{i}", "chosen": f"a{j}", "rejected": f"b{j}"}
        for i in range(10)
        for j in range(3)
    ]
    train, held = split_records(recs, 0.2, seed=0)
    held_prompts = {r["prompt"] for r in held}
    assert len(held_prompts) == 2 and len(held) == 6 and len(train) == 24
    assert not held_prompts & {r["prompt"] for r in train}
    chat = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a", "rejected": "b"}
        for i in range(5)
    ]
    assert len(split_records(chat, 0.2, seed=0)[1]) == 1  # message lists work as prompts too
    with pytest.raises(ConfigError, match="too few to hold out"):
        split_records(recs[:3], 0.5, seed=0)  # one prompt cannot be split


def test_build_pairs_keeps_best_and_worst(tiny):
    """Reward = completion length in characters: the chosen text is the longest of the n samples,
    the rejected the shortest, and pairs whose gap is not above min_gap are dropped."""
    model, tok = tiny
    rows = [{"prompt": "The movie was", "id": 0}, {"prompt": "This film is", "id": 1}]
    seen = {}

    def length_reward(prompts, completions, batch):
        seen["batch"] = batch
        return [float(len(c)) for c in completions]

    gen = GenerationConfig(max_new_tokens=6, temperature=1.0, n=4)
    torch.manual_seed(0)
    pairs, stats = build_pairs(model, tok, rows, length_reward, gen, min_gap=-1.0)
    assert seen["batch"]["id"] == [0, 0, 0, 0, 1, 1, 1, 1]  # the rows' fields reach the reward
    assert len(pairs) == 2
    for p in pairs:
        assert p["score_chosen"] == len(p["chosen"]) and p["score_rejected"] == len(p["rejected"])
        assert p["score_chosen"] >= p["score_rejected"]
    assert stats["samples"] == 8
    none, stats = build_pairs(model, tok, rows, length_reward, gen, min_gap=1e9)
    assert none == [] and stats["pairs"] == 0 and stats["skipped: gap too small"] == 2
    # all scores tied: best and worst are still two different samples (first and last)
    ties, _ = build_pairs(model, tok, rows, lambda p, c, b: [0.0] * len(c), gen, min_gap=-1.0)
    assert len(ties) == 2 and all(t["chosen"] != t["rejected"] for t in ties)
    with pytest.raises(ConfigError, match="at least 2 samples"):
        build_pairs(model, tok, rows, length_reward, GenerationConfig(n=1), min_gap=0.0)


def test_build_pairs_several_disjoint_pairs_per_prompt(tiny):
    """Reward fixed per sample position: scores (per prompt) 0, 5, 1, 4, 2, 3 -> sorted positions
    0, 2, 4, 5, 3, 1; pairs (1 vs 0, gap 5), (3 vs 2, gap 3), (5 vs 4, gap 1); min_gap 2 keeps
    the first two; no sample is used twice."""
    model, tok = tiny
    rows = [{"prompt": "The movie was"}, {"prompt": "This film is"}]
    fixed = [0.0, 5.0, 1.0, 4.0, 2.0, 3.0]
    gen = GenerationConfig(max_new_tokens=8, temperature=1.0, n=6)
    torch.manual_seed(0)
    pairs, stats = build_pairs(
        model, tok, rows, lambda p, c, b: fixed * 2, gen, min_gap=2.0, pairs_per_prompt=3
    )
    got = [(p["score_chosen"], p["score_rejected"]) for p in pairs]
    assert got == [(5.0, 0.0), (4.0, 1.0)] * 2
    assert stats["skipped: gap too small"] == 2
    with pytest.raises(ConfigError, match="pairs_per_prompt"):
        build_pairs(
            model, tok, rows, lambda p, c, b: fixed * 2, gen, min_gap=0.0, pairs_per_prompt=4
        )


def test_pairs_jsonl_roundtrip(tmp_path):
    path = tmp_path / "pairs.jsonl"
    recs = [
        {"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1, "score_rejected": 0.5},
        {"prompt": "d", "chosen": "e", "rejected": "f", "score_chosen": "high", "other": 1},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs))
    # numeric build scores are kept (as floats); anything else beyond the three columns is not
    assert load_records(PairsConfig(), str(path)) == [
        {"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": 1.0, "score_rejected": 0.5},
        {"prompt": "d", "chosen": "e", "rejected": "f"},
    ]


@pytest.mark.parametrize(
    "module, name", [("dpo", "dpo_sentiment"), ("reward_model", "reward_model_sentiment")]
)
def test_shipped_configs_load(module, name):
    import importlib
    from pathlib import Path

    from posttrain.config import load_config

    root = Path(__file__).resolve().parents[2]
    mod = importlib.import_module(f"posttrain.algos.{module}")
    cfg = load_config(mod.Config, root / "configs" / f"{name}.toml")
    assert cfg.build.enabled and cfg.task.name == "sentiment" and cfg.model.name == "default"
