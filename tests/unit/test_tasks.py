"""Tasks: unit-conversion generator and metrics, sentiment rewards, ROUGE, custom-task loading."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pandas as pd
import pytest
import torch

from posttrain.config import ConfigError
from posttrain.tasks import TaskConfig, columns, load_task
from posttrain.tasks import unit_conversion as uc

# ---------------------------------------------------------------------------------------------
# Unit conversion


def test_table_agrees_with_pint_on_every_unit():
    import pint

    ureg = pint.UnitRegistry()
    for u in uc.UNITS:
        if u.dimension == "temperature":
            continue
        base = next(b for b in uc.UNITS if b.dimension == u.dimension and b.factor == 1)
        expected = ureg.parse_expression(u.pint).to(base.pint).magnitude  # base has no factor
        assert float(u.factor) == pytest.approx(expected, rel=1e-9), u.key


def test_conversions_agree_with_pint_on_generated_sample():
    import pint

    ureg = pint.UnitRegistry()
    task = load_task(TaskConfig(train_size=50, validation_size=10, test_size=60, seed=3))
    rows = task.rows("train") + task.rows("test")
    for r in rows:
        src, dst = uc.BY_KEY[r["from_unit"]], uc.BY_KEY[r["to_unit"]]
        if src.dimension == "temperature":  # offset units: a Quantity, not a product
            q = ureg.Quantity(float(r["value"]), src.pint).to(dst.pint).magnitude
        else:
            a, b = (ureg.parse_expression(u.pint).to_base_units() for u in (src, dst))
            q = float(r["value"]) * (a / b).to("dimensionless").magnitude
        assert r["answer"] == pytest.approx(q, rel=1e-9, abs=1e-9), r["question"]


def test_exact_answers_by_hand():
    assert uc.convert("6", "kg", "g") == 6000.0
    assert uc.convert("3", "ft", "in") == 36.0
    assert uc.convert("1", "mi", "km") == 1.609344
    assert uc.convert("100", "C", "F") == 212.0
    assert uc.convert("-40", "F", "C") == -40.0
    assert uc.convert("0", "K", "C") == -273.15
    assert uc.convert("36", "km/h", "m/s") == 10.0
    assert uc.convert("1", "GiB", "MiB") == 1024.0
    assert uc.convert("8", "bit", "B") == 1.0
    # exact: 0.1 + 0.2 style float error is not introduced (Fraction arithmetic, one rounding)
    assert uc.convert("0.3", "m", "cm") == 30.0
    assert uc.convert("1", "in", "cm") == float(Fraction("2.54"))
    with pytest.raises(ValueError, match="cannot convert"):
        uc.convert("1", "kg", "m")


def test_splits_disjoint_reproducible_and_sized():
    cfg = TaskConfig(train_size=300, validation_size=40, test_size=80, seed=7)
    a, b = load_task(cfg), load_task(cfg)
    splits = {s: a.rows(s) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 300, "validation": 40, "test": 80}
    assert splits["test"] == b.rows("test")  # same seed, same rows
    keys = {
        s: {(r["from_unit"], r["to_unit"], r["value"]) for r in rows} for s, rows in splits.items()
    }
    assert all(len(keys[s]) == len(splits[s]) for s in splits)  # no duplicate inside a split
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    questions = {s: {r["question"] for r in rows} for s, rows in splits.items()}
    assert not questions["train"] & questions["test"]
    # the test split does not depend on the train size; another seed gives other questions
    small = load_task(TaskConfig(train_size=10, validation_size=40, test_size=80, seed=7))
    assert small.rows("test") == splits["test"]
    other = load_task(TaskConfig(train_size=10, validation_size=10, test_size=80, seed=8))
    assert [r["question"] for r in other.rows("test")] != [r["question"] for r in splits["test"]]


def test_generator_covers_dimensions_phrasings_and_value_kinds():
    rows = load_task(TaskConfig()).rows("train")
    assert len(rows) == 1000
    assert {r["dimension"] for r in rows} == set(uc.DIMENSIONS)
    assert sum("." in r["value"] for r in rows) > 100  # decimals
    assert sum("." not in r["value"] for r in rows) > 100  # integers
    starts = {r["question"].split()[0] for r in rows}
    assert len(starts) >= 5
    r = rows[0]
    assert set(r) >= {"prompt", "question", "answer"} and isinstance(r["answer"], float)
    # the worked solution's answer is the true answer
    assert all(uc.is_correct(uc.parse_answer(r["solution"]), r["answer"], 1e-6) for r in rows)


def test_is_correct_tolerance_and_zero():
    assert uc.is_correct(100.9, 100.0, 0.01)
    assert not uc.is_correct(101.1, 100.0, 0.01)
    assert uc.is_correct(-99.0, -100.0, 0.01)
    assert uc.is_correct(0.005, 0.0, 0.01)  # answer 0: absolute tolerance rel_tol
    assert not uc.is_correct(0.02, 0.0, 0.01)
    assert not uc.is_correct(None, 1.0)
    assert not uc.is_correct(math.nan, 1.0)


def test_unit_reward_and_metrics():
    task = load_task(TaskConfig(format_reward=0.1, train_size=10, validation_size=5, test_size=5))
    batch = {"answer": [6000.0, 36.0, 0.0, 2.0]}
    comps = ["<answer>6000</answer>", "<answer>35</answer>", "zero", "<answer>2.01</answer>"]
    r = task.reward(["p"] * 4, comps, batch)
    torch.testing.assert_close(r, torch.tensor([1.1, 0.1, 0.0, 1.1]))
    summary, per = task.evaluate(comps, batch)
    assert summary == {"accuracy": 0.5, "answer_rate": 0.75}
    assert [p["correct"] for p in per] == [True, False, False, True]


def test_unit_prompts_follow_strategy():
    cot = load_task(TaskConfig(strategy="cot", train_size=20, validation_size=5, test_size=5))
    assert cot.rows("test")[0]["prompt"][-1]["role"] == "user"
    assert cot.generation().chat and cot.generation().stop == ["</answer>"]
    direct = load_task(TaskConfig(strategy="direct", train_size=20, validation_size=5, test_size=5))
    row = direct.rows("test")[0]
    assert row["prompt"] == row["question"] + " " and not direct.generation().chat
    few = load_task(TaskConfig(strategy="few_shot", train_size=20, validation_size=5, test_size=5))
    assert len(few.rows("test")[0]["prompt"]) == 2 + 2 * 3  # system, 3 examples, question


def test_arithmetic_verifier():
    assert uc.check_arithmetic("6 * 1000 = 6000") == 1.0
    assert uc.check_arithmetic("6 * 1000 = 600 and 10 / 4 = 2.5") == 0.5
    assert uc.check_arithmetic("no equations") == 0.5


def test_unit_conversion_rejects_source():
    with pytest.raises(ConfigError, match="custom"):
        load_task(TaskConfig(source="x.csv"))
