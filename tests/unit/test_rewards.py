"""The reward interface: components, weights, classifiers, errors and skipping, normalisation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tokenizer

from posttrain.config import ConfigError
from posttrain.rewards import RewardConfig, RewardError, build_reward, load_function


class LengthTask:
    """A fake task: reward = number of characters in the completion."""

    name = "fake"

    def reward(self, prompts, completions, batch):
        return torch.tensor([float(len(c)) for c in completions])


class FlakyTask:
    """Raises on completions containing 'boom', returns NaN on 'nan'."""

    name = "flaky"

    def reward(self, prompts, completions, batch):
        out = []
        for c in completions:
            if "boom" in c:
                raise ValueError("cannot score this")
            out.append(float("nan") if "nan" in c else 1.0)
        return out


PROMPTS = ["p0", "p1", "p2"]


def test_task_and_rouge_weighted_sum():
    """total = 0.5 * len(completion) + 2 * rouge1 F. 'the cat' vs 'the dog': P = R = 1/2, F = 0.5."""
    cfg = RewardConfig(components=["task", "rouge:rouge1"], weights=[0.5, 2.0])
    fn = build_reward(cfg, LengthTask(), "cpu")
    batch = {"reference": ["the dog", "a b", "cat"]}
    out = fn(PROMPTS, ["the cat", "a b", "x"], batch)
    torch.testing.assert_close(out.components["task"], torch.tensor([7.0, 3.0, 1.0]))
    torch.testing.assert_close(out.components["rouge1"], torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(out.total, torch.tensor([3.5 + 1.0, 1.5 + 2.0, 0.5]))
    assert out.valid.all()
    m = fn.metrics(out)
    assert m["reward/task"] == pytest.approx(11 / 3)
    assert m["reward/rouge1"] == pytest.approx(0.5)
    assert m["reward/skipped"] == 0.0


def test_config_errors():
    with pytest.raises(ConfigError, match="one weight per component"):
        build_reward(RewardConfig(components=["task"], weights=[1.0, 2.0]), LengthTask(), "cpu")
    with pytest.raises(ConfigError, match="unknown reward component"):
        build_reward(RewardConfig(components=["vibes"]), None, "cpu")
    with pytest.raises(ConfigError, match="needs a task"):
        build_reward(RewardConfig(components=["task"]), None, "cpu")
    fn = build_reward(RewardConfig(components=["rouge:rougeL"]), None, "cpu")
    with pytest.raises(ConfigError, match="reference"):
        fn(["p"], ["c"], {"prompt": ["p"]})


def test_nan_and_raise_stop_with_the_sample_named():
    fn = build_reward(RewardConfig(components=["task"]), FlakyTask(), "cpu")
    with pytest.raises(RewardError, match=r"sample 1 .*'a nan here'.*on_error=skip"):
        fn(PROMPTS, ["fine", "a nan here", "ok"], {})
    with pytest.raises(RewardError, match=r"ValueError.*sample 2 .*'boom goes'"):
        fn(PROMPTS, ["fine", "ok", "boom goes"], {})


def test_skip_marks_invalid_and_counts():
    cfg = RewardConfig(components=["task"], on_error="skip")
    fn = build_reward(cfg, FlakyTask(), "cpu")
    out = fn(PROMPTS + ["p3"], ["fine", "a nan", "boom", "ok"], {})
    assert out.valid.tolist() == [True, False, False, True]
    assert out.total.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert math.isnan(out.components["task"][2])
    m = fn.metrics(out)
    assert m["reward/skipped"] == 2.0
    assert m["reward/task"] == 1.0


def test_python_reward_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def exclaim(prompts, completions, batch):\n"
        "    return [c.count('!') + batch['bonus'][i] for i, c in enumerate(completions)]\n"
    )
    fn = build_reward(RewardConfig(components=[f"python:{f}:exclaim"]), None, "cpu")
    out = fn(["a", "b"], ["hi!!", "no"], {"bonus": [0.5, 1.0]})
    assert list(out.components) == ["exclaim"]
    torch.testing.assert_close(out.total, torch.tensor([2.5, 1.0]))
    with pytest.raises(ConfigError, match="no function"):
        load_function(f"{f}:missing")
    with pytest.raises(ConfigError, match="module:function"):
        load_function("nocolon")


def test_python_reward_wrong_length(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("def r(prompts, completions, batch):\n    return [1.0]\n")
    fn = build_reward(RewardConfig(components=[f"python:{f}:r"]), None, "cpu")
    with pytest.raises(RewardError, match="returned 1 values for 2 samples"):
        fn(["a", "b"], ["x", "y"], {})


def test_normalize_running_moments_and_resume():
    """Two batches [1, 3] and [5, 7]: after both, running mean 4 and sample std sqrt(20/3);
    the second batch is standardised with those: (5-4)/std, (7-4)/std."""
    cfg = RewardConfig(components=["task"], normalize=True)
    fn = build_reward(cfg, LengthTask(), "cpu")
    fn(["a", "b"], ["x", "xxx"], {})
    state = fn.state_dict()
    out = fn(["a", "b"], ["xxxxx", "xxxxxxx"], {})
    std = (20 / 3) ** 0.5
    torch.testing.assert_close(out.total, torch.tensor([1 / std, 3 / std]))
    torch.testing.assert_close(out.raw_total, torch.tensor([5.0, 7.0]))
    # a resumed reward gives the same numbers
    fn2 = build_reward(cfg, LengthTask(), "cpu")
    fn2.load_state_dict(state)
    out2 = fn2(["a", "b"], ["xxxxx", "xxxxxxx"], {})
    torch.testing.assert_close(out2.total, out.total)
    assert fn2.metrics(out2)["reward/running_mean"] == pytest.approx(4.0)


def _save_classifier(path, num_labels, labels=None):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    tok = build_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(0)
    cfg = DistilBertConfig(
        vocab_size=len(tok),
        dim=16,
        hidden_dim=32,
        n_layers=1,
        n_heads=2,
        max_position_embeddings=128,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
    )
    if labels:
        cfg.id2label = dict(enumerate(labels))
        cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    model = DistilBertForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


TEXTS = ["This film is a wonderful story", "terrible, boring", "fun"]


def test_classifier_label_probability(tmp_path):
    model, tok = _save_classifier(tmp_path / "clf", 2, ["NEGATIVE", "POSITIVE"])
    cfg = RewardConfig(
        components=[f"classifier:{tmp_path / 'clf'}"], label="positive", batch_size=2
    )
    fn = build_reward(cfg, None, "cpu")
    out = fn(["p"] * 3, TEXTS, {})
    with torch.no_grad():  # one row at a time, no padding
        want = [torch.softmax(model(**tok(t, return_tensors="pt")).logits, -1)[0, 1] for t in TEXTS]
    torch.testing.assert_close(out.components["classifier"], torch.stack(want), atol=1e-5, rtol=0)
    assert ((out.total > 0) & (out.total < 1)).all()
    # index 0 = NEGATIVE: probabilities add up to one
    cfg0 = RewardConfig(components=[f"classifier:{tmp_path / 'clf'}"], label="0")
    out0 = build_reward(cfg0, None, "cpu")(["p"] * 3, TEXTS, {})
    torch.testing.assert_close(out0.total + out.total, torch.ones(3))


def test_classifier_wrong_label_lists_labels(tmp_path):
    _save_classifier(tmp_path / "clf", 2, ["NEGATIVE", "POSITIVE"])
    cfg = RewardConfig(components=[f"classifier:{tmp_path / 'clf'}"], label="joy")
    with pytest.raises(ConfigError, match="0=NEGATIVE, 1=POSITIVE"):
        build_reward(cfg, None, "cpu")
    cfg = RewardConfig(components=[f"classifier:{tmp_path / 'clf'}"], label="5")
    with pytest.raises(ConfigError, match="has 2 labels"):
        build_reward(cfg, None, "cpu")


def test_reward_model_raw_logit_on_prompt_and_completion(tmp_path):
    """num_labels == 1: the reward is the raw logit of prompt + completion (model: default)."""
    model, tok = _save_classifier(tmp_path / "rm", 1)
    cfg = RewardConfig(components=[f"model:{tmp_path / 'rm'}"])
    fn = build_reward(cfg, None, "cpu")
    prompts = ["Q: ", "Review: ", ""]
    out = fn(prompts, TEXTS, {})
    with torch.no_grad():
        want = [
            model(**tok(p + t, return_tensors="pt")).logits[0, 0] for p, t in zip(prompts, TEXTS)
        ]
    torch.testing.assert_close(out.components["model"], torch.stack(want), atol=1e-5, rtol=0)


def test_duplicate_component_names_get_suffixes(tmp_path):
    cfg = RewardConfig(components=["rouge:rouge1", "rouge:rouge1"], weights=[1.0, 1.0])
    fn = build_reward(cfg, None, "cpu")
    out = fn(["p"], ["a b"], {"reference": ["a b"]})
    assert list(out.components) == ["rouge1", "rouge1_2"]
    assert out.total.item() == pytest.approx(2.0)
