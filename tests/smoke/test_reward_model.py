"""`posttrain reward-model` through the CLI on the tiny model; the saved model loads by path."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.cli import main
from posttrain.runs import read_jsonl

GOOD = [" great fun", " a wonderful story", " good actors", " fun and great"]
BAD = [" terrible", " boring and bad", " a bad ending", " terrible boring"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {
            "prompt": f"The movie {i} was",
            "chosen": GOOD[i % 4],
            "rejected": BAD[i % 4],
            "score_chosen": 0.9,
            "score_rejected": 0.1 + 0.1 * (i % 4),
        }
        for i in range(16)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rm(tiny_dir, pairs, out, name, *extra):
    args = [
        "reward-model",
        "--model.name", str(tiny_dir),
        "--data.source", str(pairs),
        "--data.eval_fraction=0.25",
        "--run.out_dir", str(out),
        "--run.name", name,
        "--run.progress=false",
        "--batch_size=4",
        *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return out / name


@pytest.mark.parametrize("lora", [False, True])
def test_reward_model_trains_and_saves(tiny_dir, pairs, tmp_path, lora):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = (
        ["--lora.enabled=true", "--lora.r=4", "--optim.lr=3e-3"] if lora else ["--optim.lr=1e-3"]
    )
    run = _rm(tiny_dir, pairs, tmp_path, f"rm-{lora}", "--epochs=4", *extra)
    rows = read_jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 12  # 12 training pairs / 4 per step x 4 epochs
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    final = json.loads((run / "eval.json").read_text())
    assert set(final) >= {"eval/accuracy", "eval/margin", "eval/loss"}
    assert final["eval/loss"] < rows[0]["eval/loss"]  # held-out loss fell from step 0
    after = json.loads((run / "eval_after.json").read_text())["summary"]
    assert after["loss"] == final["eval/loss"] and (run / "eval_before.json").is_file()
    # every held-out pair with its two scores, the building reward's gap, and the verdict
    preds = read_jsonl(run / "eval_pairs.jsonl")
    assert len(preds) == 4
    assert all(p["correct"] == (p["r_chosen"] > p["r_rejected"]) for p in preds)
    assert sum(p["correct"] for p in preds) / 4 == pytest.approx(final["eval/accuracy"])
    assert all(p["source_gap"] == pytest.approx(0.8 - 0.1 * GOOD.index(p["chosen"])) for p in preds)
    # a plain sequence classifier with one output, loadable by path (LoRA merged)
    path = run / "final"
    assert not (path / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["The movie 1 was great fun", "The movie 1 was terrible"], return_tensors="pt",
              padding=True)  # fmt: skip
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 1)


def test_reward_model_score_suffix_travels_with_the_model(tiny_dir, pairs, tmp_path):
    """A scoring suffix is saved in the model's config and the model: reward appends it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.rewards import ClassifierScorer

    sfx = " Verdict:"
    run = _rm(tiny_dir, pairs, tmp_path, "rm-sfx", "--max_steps=2", f"--score_suffix={sfx}")
    path = run / "final"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.posttrain_score_suffix == sfx
    scorer = ClassifierScorer(str(path), "0", torch.device("cpu"), use_prompt=True)
    got = scorer(["The movie 1 was", "The movie 2 was"], [" great fun", " terrible"], {})
    with torch.no_grad():
        for text, score in zip(["The movie 1 was great fun", "The movie 2 was terrible"], got):
            want = model(**tok(text + sfx, return_tensors="pt")).logits[0, 0]
            assert float(score) == pytest.approx(float(want), abs=1e-5)
            plain = model(**tok(text, return_tensors="pt")).logits[0, 0]
            assert float(plain) != pytest.approx(float(want), abs=1e-5)  # the suffix counts


def test_reward_model_resume_is_exact(tiny_dir, pairs, tmp_path):
    common = ["--optim.lr=1e-3", "--run.save_every=2", "--batch_size=2", "--optim.grad_accum=2"]
    full = _rm(tiny_dir, pairs, tmp_path, "whole", "--max_steps=4", *common)
    part = _rm(tiny_dir, pairs, tmp_path, "part", "--max_steps=2", *common)
    _rm(tiny_dir, pairs, tmp_path, "part", "--max_steps=4", f"--run.resume={part}", *common)
    a = [r for r in read_jsonl(full / "metrics.jsonl") if "loss" in r]
    b = [r for r in read_jsonl(part / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)


def test_reward_model_build_only(tiny_dir, tmp_path):
    """--build.enabled --build.only samples pairs with model.name (a causal LM) and stops."""
    run = _rm(tiny_dir, "unused.jsonl", tmp_path, "pairs", "--build.enabled=true",
              "--build.only=true", "--task.name=unit_conversion", "--build.prompts=4",
              "--build.n=2", "--build.min_gap=-1", "--build.max_new_tokens=4")  # fmt: skip
    assert len(read_jsonl(run / "pairs.jsonl")) == 4
    assert not (run / "final").exists()
