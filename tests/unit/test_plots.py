"""plots.py and the pure parts of report.py, compare.py and implied.py: grouping, smoothing,
summaries, implied numbers."""

from __future__ import annotations

import json

import pytest

from posttrain.compare import config_differences, run_labels
from posttrain.implied import implied
from posttrain.plots import (
    auto_smoothing,
    ema,
    group_metrics,
    group_of,
    logged_once,
    plot_records,
    series,
)
from posttrain.report import headline_keys, pick_steps, read_evals, summarize


def test_ema_hand_computed():
    """s = 0.5 over [1, 3, 3]:
    m1 = 0.5*0 + 0.5*1 = 0.5,     debiased 0.5 / (1 - 0.5)   = 1
    m2 = 0.5*0.5 + 0.5*3 = 1.75,  debiased 1.75 / (1 - 0.25) = 7/3
    m3 = 0.5*1.75 + 0.5*3 = 2.375, debiased 2.375 / (1 - 0.125) = 19/7
    """
    assert ema([1.0, 3.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3, 19 / 7])
    assert ema([2.0, 5.0], 0.0) == [2.0, 5.0]
    with pytest.raises(ValueError, match="smoothing"):
        ema([1.0], 1.0)


def test_auto_smoothing_follows_run_length():
    assert auto_smoothing(5) == 0.0
    assert auto_smoothing(20) == pytest.approx(0.5)
    assert auto_smoothing(1000) == 0.9


@pytest.mark.parametrize(
    "key, group",
    [
        ("reward", "reward"),
        ("reward/format", "reward"),
        ("rewards/chosen", "reward"),
        ("rewards/accuracy", "reward"),
        ("kl", "kl"),
        ("kl_coef", "kl"),
        ("loss", "loss"),
        ("loss/kl", "loss"),  # a loss term, although it is a KL
        ("policy_loss", "loss"),
        ("value_loss", "loss"),
        ("entropy", "entropy"),
        ("completion_len", "length"),
        ("tokens/completion", "length"),
        ("tokens_per_s", "other"),  # throughput, neither a length nor a time
        ("lr", "lr"),
        ("learning_rate", "lr"),
        ("time/generate", "time"),
        ("seconds_training", "time"),
        ("eval/reward", "eval"),
        ("eval/loss", "eval"),
        ("grad_norm", "other"),
        ("clip_frac", "other"),
    ],
)
def test_group_of(key, group):
    assert group_of(key) == group


def test_series_skips_what_cannot_be_plotted():
    recs = [
        {"step": 1, "a": 1.0, "b": None, "c": "text", "d": True, "e": 1e308},
        {"step": 2, "a": 2, "b": 0.5},
        {"step": 3},
    ]
    assert series(recs) == {"a": ([1.0, 2.0], [1.0, 2.0]), "b": ([2.0], [0.5])}


def test_group_metrics_keeps_order_and_drops_empty_groups():
    got = group_metrics(["loss", "reward/b", "step", "reward", "grad_norm"])
    assert got == {"reward": ["reward/b", "reward"], "loss": ["loss"], "other": ["grad_norm"]}


def _recs(n: int, keys: list[str]) -> list[dict]:
    return [{"step": s, **{k: float(s + i) for i, k in enumerate(keys)}} for s in range(1, n + 1)]


def test_plot_records_one_png_per_group(tmp_path):
    from matplotlib.image import imread

    keys = ["reward", "reward/x", "kl", "loss", "time/generate", "time/train", "grad_norm"]
    paths = plot_records(_recs(12, keys), tmp_path)
    assert [p.name for p in paths] == ["reward.png", "kl.png", "loss.png", "time.png", "other.png"]
    for p in paths:
        h, w, _ = imread(p).shape
        assert h > 100 and w > 100


def test_plot_records_handles_sparse_and_empty(tmp_path):
    # eval logged at two steps only: plotted; a metric at a single step: a number, not a chart
    recs = _recs(5, ["loss"]) + [{"step": 5, "eval/acc": 0.5}, {"step": 1, "eval/acc": 0.1}]
    recs.append({"step": 6, "once": 1.0})
    assert [p.name for p in plot_records(recs, tmp_path)] == ["loss.png", "eval.png"]
    assert logged_once(recs) == {"once": (6.0, 1.0)}
    assert plot_records([], tmp_path / "none") == []
    assert plot_records([{"step": 1, "note": "text"}], tmp_path / "none") == []
    assert not (tmp_path / "none").exists()


# ---- report helpers ------------------------------------------------------------------------


def test_implied_for_a_rollout_config():
    """4 prompts x 8 samples = 32 samples; 2 epochs x ceil(32 / 12) = 2 x 3 = 6 updates;
    32 x 64 new tokens = 2048; 32 x 10 steps = 320 samples in the run."""
    cfg = {
        "steps": 10,
        "batch_size": 4,
        "ppo_epochs": 2,
        "mini_batch_size": 12,
        "gen": {"n": 8, "max_new_tokens": 64},
        "optim": {"grad_accum": 1},
    }
    got = {q: v for q, v, _ in implied(cfg, "grpo")}
    assert got == {
        "optimizer steps (training steps)": "10",
        "prompts per step": "4",
        "samples per step": "32",
        "optimizer updates per rollout": "6",
        "completion tokens per step (at most)": "2048",
        "samples generated in the run": "320",
    }


def test_implied_for_offline_and_missing_keys():
    """DPO: 2 pairs x 4 accumulation = 8 pairs per step; 8 x 128 tokens x 2 (chosen, rejected)."""
    cfg = {"batch_size": 2, "max_length": 128, "optim": {"grad_accum": 4}}
    got = {q: v for q, v, _ in implied(cfg, "dpo")}
    assert got == {"pairs per step": "8", "tokens per step (at most)": "2048"}
    assert implied({"optim": {"lr": 1.0}}, "grpo") == []
    # sft: max_steps = 0 means "train for `epochs`"; grpo: updates = inner_epochs x num_minibatches
    sft = {"train": {"batch_size": 4, "max_steps": 0, "epochs": 3}, "optim": {"grad_accum": 2}}
    got = {q: v for q, v, _ in implied(sft, "sft")}
    assert got == {"epochs over the training data": "3", "examples per step": "8"}
    grpo = {"batch_size": 2, "group_size": 4, "inner_epochs": 2, "num_minibatches": 2}
    got = {q: v for q, v, _ in implied(grpo, "grpo")}
    assert (got["samples per step"], got["optimizer updates per rollout"]) == ("8", "4")
    assert implied({}, "sft") == []


def test_pick_steps_spreads_from_first_to_last():
    assert pick_steps([3, 1, 2]) == [1, 2, 3]
    assert pick_steps(list(range(0, 100, 10))) == [0, 30, 60, 90]
    assert pick_steps([5, 5, 5, 6, 7, 8, 9], k=2) == [5, 9]


def test_summarize_best_follows_the_metric_direction():
    recs = [{"step": 1, "reward": 0.1, "loss": 2.0, "kl": 0.0}]
    recs += [{"step": 2, "reward": 0.9, "loss": 1.0, "kl": 0.5}]
    recs += [{"step": 3, "reward": 0.5, "loss": 1.5, "kl": 0.2}]
    s = summarize(recs, ["reward", "loss", "kl", "absent"])
    assert s["reward"] == {"first": 0.1, "final": 0.5, "best": 0.9, "best_step": 2.0, "n": 3}
    assert (s["loss"]["best"], s["loss"]["best_step"]) == (1.0, 2.0)
    assert s["kl"]["best"] is None and "absent" not in s
    assert summarize([{"reward/std": 1.0}], ["reward/std"])["reward/std"]["best"] is None


def test_headline_keys_put_totals_first_and_spreads_last():
    keys = ["reward/std", "reward/format", "reward/mean", "loss/policy", "loss/total", "kl/coef"]
    keys += ["kl/k1", "eval/accuracy", "entropy", "lr"]
    assert headline_keys(keys, limit=8) == [
        "reward/mean", "reward/format", "eval/accuracy", "loss/total", "loss/policy", "kl/k1", "kl/coef",
    ]  # fmt: skip


def test_read_evals_order_and_both_shapes(tmp_path):
    (tmp_path / "eval_after.json").write_text(json.dumps({"acc": 0.5, "sub": {"x": 1}}))
    (tmp_path / "eval_step_10.json").write_text(json.dumps({"summary": {"acc": 0.3}}))
    (tmp_path / "eval_step_2.json").write_text(json.dumps({"summary": {"acc": 0.2}}))
    (tmp_path / "eval_before.json").write_text(
        json.dumps({"summary": {"acc": 0.1}, "examples": [{"prompt": "p"}]})
    )
    ev = read_evals(tmp_path)
    assert list(ev) == ["before", "step_2", "step_10", "after"]
    assert ev["after"]["summary"] == {"acc": 0.5, "sub/x": 1}
    assert ev["before"]["examples"] == [{"prompt": "p"}]


def test_config_differences_and_labels():
    a = {"beta": 0.1, "optim": {"lr": 1e-5}, "run": {"name": "a", "seed": 0}}
    b = {"beta": 0.2, "optim": {"lr": 1e-5}, "run": {"name": "b", "seed": 0}}
    diffs = config_differences([a, b])
    assert diffs == ["beta"]
    runs = [{"name": "a", "config": a}, {"name": "b", "config": b}]
    assert run_labels(runs, diffs) == ["beta=0.1", "beta=0.2"]
    assert run_labels(runs, []) == ["a", "b"]


def test_sweep_labels_come_from_the_key_that_differs_in_every_run():
    """A DPO sweep turns off the before-eval and reuses the reference cache after its first run:
    those keys differ too, but only beta differs in every run, so beta alone labels them."""
    cfgs = [
        {"beta": b, "eval": {"before": i == 0}, "ref": {"cache": None if i == 0 else "c.json"}}
        for i, b in enumerate([0.1, 0.05, 0.5])
    ]
    runs = [{"name": f"beta_{c['beta']}", "config": c} for c in cfgs]
    diffs = config_differences(cfgs)
    assert set(diffs) == {"beta", "eval.before", "ref.cache"}
    assert run_labels(runs, diffs) == ["beta=0.1", "beta=0.05", "beta=0.5"]


def test_eval_record_writes_before_and_after(tmp_path):
    from posttrain.config import RunConfig
    from posttrain.runs import Run

    run = Run.start(RunConfig(out_dir=str(tmp_path), name="r"), "reinforce")
    run.eval_record(0, {"step": 0, "eval/reward": 0.25, "eval/note": "x"}, [{"prompt": "p"}] * 9)
    run.eval_record(4, {"eval/reward": 0.5})
    run.eval_record(8, {"eval/reward": 0.75})  # the last evaluation is the "after"
    ev = read_evals(run.path)
    assert list(ev) == ["before", "after"]
    assert ev["before"]["summary"] == {"reward": 0.25} and len(ev["before"]["examples"]) == 8
    assert ev["after"]["summary"] == {"reward": 0.75}
