"""Unit conversion's worked solutions with calculator calls, varied train wordings and the
per-dimension accuracy."""

from __future__ import annotations

import itertools
import re

import pytest

from posttrain.prompts import parse_answer
from posttrain.tasks import TaskConfig, load_task
from posttrain.tasks import unit_conversion as uc
from posttrain.tools import Toolbox, ToolConfig, calc, calls_in


def test_tool_solution_is_right_for_every_pair_and_value():
    """Every pair of units of a dimension, several values: the calculator's result (the answer)
    is within 1e-6 of the exact conversion, and each stated fact matches the unit table."""
    box = Toolbox.from_config(ToolConfig(names=["calculator"]))
    for a, b in itertools.permutations(uc.UNITS, 2):
        if a.dimension != b.dimension:
            continue
        for value in (
            "1",
            "37",
            "0.25",
            "4096",
            "-12.5" if a.dimension == "temperature" else "7.75",
        ):
            text = uc.tool_solution(value, a.key, b.key)
            assert uc.is_correct(parse_answer(text), uc.convert(value, a.key, b.key), 1e-6), text
            (call,) = calls_in(text, box)
            assert call.result == calc(call.call)
            assert call.result == re.search(r"<answer>(.*)</answer>", text).group(1)
            if a.dimension == "temperature":
                continue
            base = uc.BY_KEY[uc.FACT_UNITS[a.dimension]]
            for unit_name, size in re.findall(r"1 ([a-z ]+?) = ([\d.e+-]+) ", text):
                unit = next(u for u in uc.UNITS if u.singular == unit_name)
                exact = float(unit.factor / base.factor)
                assert abs(float(size) - exact) <= 1e-6 * exact, (unit_name, size, exact)


def test_hand_worked_solution():
    text = uc.tool_solution("4.2", "mi", "km")
    assert text == (
        "1 mile = 1609.344 meters. 1 kilometer = 1000 meters.\n"
        "<calc>4.2 * 1609.344 / 1000</calc> = 6.7592448\n<answer>6.7592448</answer>"
    )
    assert uc.tool_solution("25", "C", "F").endswith(
        "<calc>25 * 9/5 + 32</calc> = 77\n<answer>77</answer>"
    )
    # the fact unit itself needs no fact
    assert uc.tool_solution("3", "m", "ft").startswith(
        "1 foot = 0.3048 meters.\n<calc>3 / 0.3048</calc>"
    )


def test_varied_wording_changes_only_the_train_questions():
    sizes = {"train": 400, "validation": 50, "test": 100}
    fixed = uc.generate_questions(0, sizes, "standard", "fixed")
    varied = uc.generate_questions(0, sizes, "standard", "varied")
    for split in ("validation", "test"):
        assert fixed[split] == varied[split]
    keys = [(r["from_unit"], r["to_unit"], r["value"]) for r in fixed["train"]]
    assert keys == [(r["from_unit"], r["to_unit"], r["value"]) for r in varied["train"]]
    changed = sum(a["question"] != b["question"] for a, b in zip(fixed["train"], varied["train"]))
    assert changed > 0.5 * len(keys)
    # no train conversion is a test or validation conversion
    held_out = {
        (r["from_unit"], r["to_unit"], r["value"]) for s in ("validation", "test") for r in fixed[s]
    }
    assert not held_out & set(keys)


def test_accuracy_per_dimension_and_length_check():
    task = load_task(TaskConfig(name="unit_conversion", strategy="direct", test_size=40))
    rows = task.rows("test")
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    completions = [uc.tool_solution(r["value"], r["from_unit"], r["to_unit"]) for r in rows]
    completions[0] = "<answer>nope</answer>"
    summary, _ = task.evaluate(completions, batch)
    dims = sorted({r["dimension"] for r in rows})
    assert {f"accuracy/{d}" for d in dims} <= set(summary)
    d0 = rows[0]["dimension"]
    n0 = sum(r["dimension"] == d0 for r in rows)
    assert summary[f"accuracy/{d0}"] == pytest.approx((n0 - 1) / n0)
    assert summary["accuracy"] == pytest.approx((len(rows) - 1) / len(rows))
    with pytest.raises(ValueError, match="one completion per row"):
        task.evaluate(completions[:-1], batch)
