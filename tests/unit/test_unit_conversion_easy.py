"""The easy level of unit conversion: integer factors, small values, disjoint exact splits."""

from __future__ import annotations

from fractions import Fraction

from posttrain.tasks import TaskConfig, load_task
from posttrain.tasks.unit_conversion import BY_KEY, easy_pairs


def test_easy_pairs_have_small_integer_factors():
    pairs = easy_pairs()
    assert ("kg", "g") in {(a.key, b.key) for a, b in pairs}
    assert ("g", "kg") not in {(a.key, b.key) for a, b in pairs}  # never a division
    for a, b in pairs:
        r = a.factor / b.factor
        assert r.denominator == 1 and (r <= 24 or r in (60, 100, 1000))


def test_easy_splits_are_disjoint_and_exact():
    task = load_task(TaskConfig(difficulty="easy"))
    rows = {s: task.rows(s) for s in ("train", "validation", "test")}
    assert [len(rows[s]) for s in rows] == [600, 50, 200]
    questions = [{r["question"] for r in v} for v in rows.values()]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2])
    for r in rows["test"]:
        factor = BY_KEY[r["from_unit"]].factor / BY_KEY[r["to_unit"]].factor
        assert 1 <= int(r["value"]) <= 50
        assert r["answer"] == float(Fraction(r["value"]) * factor)


def test_few_shot_rows_use_similar_examples_but_never_their_own_question():
    task = load_task(TaskConfig(difficulty="easy", strategy="few_shot"))
    for row in task.rows("train")[:50]:
        shown = [m["content"] for m in row["prompt"][1:-1] if m["role"] == "user"]
        assert len(shown) == 3 and row["question"] not in shown
        assert row["prompt"][-1] == {"role": "user", "content": row["question"]}
