"""Tasks: unit-conversion generator and metrics, sentiment rewards, ROUGE, custom-task loading."""

from __future__ import annotations

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


# ---------------------------------------------------------------------------------------------
# Sentiment


def test_sentiment_embedded_openings():
    from posttrain.tasks.sources import read_lines

    lines = read_lines("sentiment_openings.txt")
    assert len(lines) >= 300 and len(set(lines)) == len(lines)
    task = load_task(TaskConfig(name="sentiment"))
    splits = {s: [r["prompt"] for r in task.rows(s)] for s in ("train", "validation", "test")}
    assert len(splits["test"]) == 200 and len(splits["validation"]) == 50
    assert len(splits["train"]) == len(lines) - 250
    assert not set(splits["train"]) & set(splits["test"])
    assert all(len(p.split()) <= 10 for p in splits["test"])
    gen = task.generation()
    assert gen.max_new_tokens == 20 and not gen.chat


def test_sentiment_prompt_truncation_words_and_tokens(tmp_path, tiny):
    from posttrain.tasks.sentiment import SentimentTask

    path = tmp_path / "reviews.csv"
    pd.DataFrame({"text": [f"word{i} " * 30 + "<br /><br />end" for i in range(20)]}).to_csv(path)
    cfg = TaskConfig(name="sentiment", source=str(path), prompt_tokens=4, test_size=5)
    rows = load_task(cfg).rows("test")  # the default "prompt" column is absent: uses "text"
    assert len(rows) == 5 and all(len(r["prompt"].split()) == 4 for r in rows)
    _, tok = tiny
    by_tokens = SentimentTask(cfg, tokenizer=tok).rows("test")
    assert all(len(tok(r["prompt"], add_special_tokens=False)["input_ids"]) <= 4 for r in by_tokens)


def test_vader_reward_mapping_and_metrics():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    task = load_task(TaskConfig(name="sentiment"))
    batch = {"prompt": ["The film was", "The film was"]}
    comps = [" wonderful and I loved it", " the the the"]
    r = task.reward(["ignored", "ignored"], comps, batch)
    c = SentimentIntensityAnalyzer().polarity_scores("The film was wonderful and I loved it")[
        "compound"
    ]
    assert r[0].item() == pytest.approx((c + 1) / 2) and r[0] > 0.5
    assert r[1].item() == pytest.approx(0.5)  # no sentiment words: compound 0
    summary, per = task.evaluate(comps, batch)
    # distinct-1: words {wonderful,and,I,loved,it,the} = 6 unique / 8 words; distinct-2: 4 + 1 unique of 6
    assert summary["distinct_1"] == pytest.approx(6 / 8)
    assert summary["distinct_2"] == pytest.approx(5 / 6)
    assert summary["length_mean"] == 4.0 and summary["positive_share"] == 0.5
    assert [p["length"] for p in per] == [5, 3]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny random DistilBert sentiment classifier with labels NEGATIVE / POSITIVE."""
    import conftest
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    path = tmp_path_factory.mktemp("clf")
    tok = conftest.build_tokenizer()
    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=len(tok),
        dim=16,
        hidden_dim=32,
        n_layers=1,
        n_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    DistilBertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_reward(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = TaskConfig(name="sentiment", classifier=str(classifier_dir), positive_label="POSITIVE")
    task = load_task(cfg)
    batch = {"prompt": ["The film was", "I saw this"]}
    r = task.reward(["x", "y"], [" good", " bad and long"], batch)
    assert r.shape == (2,) and ((r > 0) & (r < 1)).all()
    # equals softmax(logits)[:, 1] of the classifier on prompt + completion, one text at a time
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        p = torch.softmax(model(**tok("The film was good", return_tensors="pt")).logits, -1)[0, 1]
    assert r[0].item() == pytest.approx(p.item(), abs=1e-5)
    # the label can be given by index
    by_index = load_task(
        TaskConfig(name="sentiment", classifier=str(classifier_dir), positive_label="1")
    )
    torch.testing.assert_close(by_index.reward(["x", "y"], [" good", " bad and long"], batch), r)


def test_classifier_wrong_label_lists_labels(classifier_dir):
    task = load_task(
        TaskConfig(name="sentiment", classifier=str(classifier_dir), positive_label="pos")
    )
    with pytest.raises(ConfigError, match=r"no label 'pos'.*0=NEGATIVE, 1=POSITIVE"):
        task.reward(["x"], [" good"], {"prompt": ["The film"]})


# ---------------------------------------------------------------------------------------------
# Summarization


def test_rouge_hand_worked():
    """reference "the cat sat on the mat", summary "the cat lay on the mat":
    ROUGE-1: overlapping unigrams the x2, cat, on, mat = 5 of 6 on both sides -> P = R = F = 5/6.
    ROUGE-2: bigrams (the cat, on the, the mat) overlap 3 of 5 -> F = 3/5.
    ROUGE-L: longest common subsequence "the cat on the mat" = 5 -> F = 5/6.
    Compression: 6 summary words / 12 article words = 0.5."""
    task = load_task(TaskConfig(name="summarization"))
    batch = {"reference": ["the cat sat on the mat"], "article": ["w " * 12]}
    summary, per = task.evaluate(["the cat lay on the mat"], batch)
    assert summary["rouge1"] == pytest.approx(5 / 6)
    assert summary["rouge2"] == pytest.approx(3 / 5)
    assert summary["rougeL"] == pytest.approx(5 / 6)
    assert summary["length_mean"] == 6 and summary["compression"] == pytest.approx(0.5)
    r = task.reward(["p"], ["the cat lay on the mat"], batch)
    assert r.item() == pytest.approx(5 / 6)
    r2 = load_task(TaskConfig(name="summarization", rouge="rouge2")).reward(
        ["p"], ["the cat lay on the mat"], batch
    )
    assert r2.item() == pytest.approx(3 / 5)
    # a different reference order: "mat the on" vs "the mat" -> ROUGE-1 P = 2/3, R = 1, F = 0.8
    s, _ = task.evaluate(["mat the on"], {"reference": ["the mat"], "article": ["a b c"]})
    assert s["rouge1"] == pytest.approx(0.8)


def test_summarization_fixture_splits_and_truncation():
    cfg = TaskConfig(name="summarization", article_tokens=20)
    task = load_task(cfg)
    sizes = {s: len(task.rows(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 20, "validation": 4, "test": 8}
    row = task.rows("test")[0]
    assert len(row["article"].split()) == 20 and row["reference"]
    assert row["prompt"][0]["role"] == "user" and row["article"] in row["prompt"][0]["content"]
    raw = load_task(TaskConfig(name="summarization", strategy="direct")).rows("test")[0]
    assert raw["prompt"].endswith("\n\nTL;DR:")
    tests = {r["reference"] for r in task.rows("test")}
    assert not tests & {r["reference"] for r in task.rows("train")}


# ---------------------------------------------------------------------------------------------
# Custom tasks


QA = pd.DataFrame(
    {
        "q": [f"What is {i} + {i}?" for i in range(30)],
        "a": [2 * i for i in range(30)],
        "ref": [f"{i} plus {i} is {2 * i}" for i in range(30)],
    }
)


def _write(df, path):
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif path.suffix == ".json":
        df.to_json(path, orient="records")
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        df.to_pickle(path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet", ".pkl"])
def test_custom_loader_formats_and_split(tmp_path, suffix):
    path = _write(QA, tmp_path / f"qa{suffix}")
    cfg = TaskConfig(
        name="custom",
        source=str(path),
        prompt_column="q",
        answer_column="a",
        reference_column="ref",
    )
    task = load_task(cfg)
    splits = {s: task.rows(s) for s in ("train", "validation", "test")}
    assert {s: len(r) for s, r in splits.items()} == {"train": 24, "validation": 3, "test": 3}
    qs = [{r["question"] for r in rows} for rows in splits.values()]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
    assert splits["test"] == load_task(cfg).rows("test")  # deterministic from the seed
    row = splits["test"][0]
    assert row["answer"] == 2 * int(row["question"].split()[2]) and row["reference"].startswith(
        row["question"].split()[2]
    )
    assert row["prompt"][-1] == {"role": "user", "content": row["question"]}


def test_custom_answer_reward_and_metrics(tmp_path):
    path = _write(QA, tmp_path / "qa.csv")
    task = load_task(
        TaskConfig(
            name="custom", source=str(path), prompt_column="q", answer_column="a", format_reward=0.5
        )
    )
    batch = {"answer": [4, 10, 0], "question": ["a", "b", "c"]}
    comps = ["<answer>4</answer>", "<answer>11</answer>", "none"]
    torch.testing.assert_close(
        task.reward(["a", "b", "c"], comps, batch), torch.tensor([1.5, 0.5, 0.0])
    )
    summary, _ = task.evaluate(comps, batch)
    assert summary["accuracy"] == pytest.approx(1 / 3) and summary["answer_rate"] == pytest.approx(
        2 / 3
    )
    # text answers: case and spaces do not matter
    assert task.correct("<answer> Paris </answer>", "paris")


REWARDS = """
import math

def length(prompts, completions, batch):
    return [float(len(c)) for c in completions]

def boom(prompts, completions, batch):
    for c in completions:
        if c == "bad":
            raise ValueError("cannot score")
    return [1.0] * len(completions)

def nan(prompts, completions, batch):
    return [1.0, math.nan][: len(completions)]
"""


def test_custom_python_reward_file_and_errors(tmp_path):
    path = _write(QA, tmp_path / "qa.jsonl")
    fn_file = tmp_path / "my_rewards.py"
    fn_file.write_text(REWARDS)

    def task(fn):
        return load_task(
            TaskConfig(name="custom", source=str(path), prompt_column="q", reward=f"{fn_file}:{fn}")
        )

    t = task("length")
    rows = t.rows("test")
    batch = columns(rows)
    assert rows[0]["prompt"] == rows[0]["question"]  # no answer column: the prompt as it is
    torch.testing.assert_close(
        t.reward(["p"] * 3, ["a", "bb", ""], batch), torch.tensor([1.0, 2.0, 0.0])
    )
    summary, per = t.evaluate(["a", "bb", ""], batch)
    assert summary["reward_mean"] == pytest.approx(1.0) and per[1]["reward"] == 2.0
    with pytest.raises(ConfigError, match=r"raised on row 1 .*ValueError: cannot score"):
        task("boom").reward(["p0", "p1", "p2"], ["ok", "bad", "ok"], batch)
    with pytest.raises(ConfigError, match=r"returned nan for row 1 .*column 'q'"):
        task("nan").reward(["p0", "p1"], ["x", "y"], {k: v[:2] for k, v in batch.items()})
    with pytest.raises(ConfigError, match="has no function 'missing'"):
        task("missing")


def test_custom_module_reward():
    t = load_task(
        TaskConfig(
            name="custom",
            source="unused.csv",
            prompt_column="q",
            reward="posttrain.tasks.sentiment:distinct_n",
        )
    )
    assert callable(t.fn)


def test_custom_errors(tmp_path):
    path = _write(QA, tmp_path / "qa.csv")
    with pytest.raises(ConfigError, match="needs data"):
        load_task(TaskConfig(name="custom", answer_column="a"))
    with pytest.raises(ConfigError, match="needs a reward"):
        load_task(TaskConfig(name="custom", source=str(path), prompt_column="q"))
    with pytest.raises(
        ConfigError, match=r"missing column\(s\) 'question'.*available columns: q, a, ref"
    ):
        load_task(
            TaskConfig(name="custom", source=str(path), prompt_column="question", answer_column="a")
        ).rows("train")
    holes = QA.copy()
    holes.loc[5, "a"] = None
    hpath = _write(holes, tmp_path / "holes.jsonl")
    t = load_task(
        TaskConfig(name="custom", source=str(hpath), prompt_column="q", answer_column="a", seed=0)
    )
    with pytest.raises(
        ConfigError, match=r"row \d+ of split '\w+' has an empty value in column 'a'"
    ):
        for s in ("train", "validation", "test"):
            t.rows(s)
    tiny = _write(QA.head(2), tmp_path / "two.csv")
    t = load_task(TaskConfig(name="custom", source=str(tiny), prompt_column="q", answer_column="a"))
    with pytest.raises(ConfigError, match="the train split is empty"):
        t.rows("train")
    empty = tmp_path / "empty.csv"
    empty.write_text("q,a\n")
    with pytest.raises(ConfigError, match="empty"):
        load_task(
            TaskConfig(name="custom", source=str(empty), prompt_column="q", answer_column="a")
        ).rows("test")


def test_hub_style_splits_carve_missing_validation(tmp_path):
    """A dataset dict with train and test but no validation (like imdb): validation is carved from
    train, disjoint from the train rows; test comes from the test split."""
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"text": [f"train review {i} is here" for i in range(40)]}
            ),
            "test": datasets.Dataset.from_dict(
                {"text": [f"test review {i} is here" for i in range(15)]}
            ),
        }
    )
    dd.save_to_disk(str(tmp_path / "reviews"))
    cfg = TaskConfig(
        name="sentiment", source=str(tmp_path / "reviews"), validation_size=5, test_size=10
    )
    task = load_task(cfg)
    train, val, test = (
        set(r["prompt"] for r in task.rows(s)) for s in ("train", "validation", "test")
    )
    assert len(val) == 5 and len(train) == 35 and len(test) == 10
    assert not train & val and all(p.startswith("test") for p in test)
