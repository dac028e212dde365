"""`posttrain report` / `posttrain compare` through the CLI, opened in a real headless chromium.

The browser (tests/browser.py, the `browser` fixture of tests/conftest.py) is Debian's
chromium driven over the DevTools protocol on a pipe. The check: the page loads, nothing is logged
at error level (console, uncaught exceptions, failed loads), every image is decoded
(naturalWidth > 0) and nothing is fetched from anywhere but data: URIs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from browser import assert_clean

from posttrain.cli import main
from posttrain.plots import plot_records

XSS = "<img src=x onerror=\"console.error('xss')\"><script>console.error('xss')</script>"

# ---- a run directory as the training commands write it -------------------------------------


def fake_run(root: Path, name: str, beta: float, steps: int = 12) -> Path:
    """config.toml, run.json, metrics.jsonl (rewards, KL, losses, times...), samples, evals."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.toml").write_text(
        f"steps = {steps}\nbatch_size = 2\nkl_coef = {beta}\n\n[gen]\nn = 4\nmax_new_tokens = 16\n"
        f'\n[run]\nname = "{name}"\nseed = 0\n'
    )
    (run / "run.json").write_text(json.dumps({"command": "grpo", "started": 1.7e9}))
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            rec = {
                "step": s,
                "reward": s / steps,
                "reward/format": 0.5 + 0.01 * s,
                "kl": beta * s,
                "loss": 1 / s,
                "loss/pg": -0.1 * s,
                "entropy": 2.0 - 0.05 * s,
                "completion_len": 10 + s,
                "lr": 1e-5,
                "time/generate": 1.0,
                "time/score": 0.1,
                "time/train": 0.5,
                "grad_norm": 0.3,
                "note": "text is not plotted",
            }
            if s % 5 == 0:
                rec["eval/accuracy"] = 0.1 * s
            f.write(json.dumps(rec) + "\n")
    with open(run / "samples.jsonl", "w") as f:
        for s in range(2, steps + 1, 2):
            for i in range(5):
                row = {"step": s, "prompt": f"{XSS} prompt {i}", "completion": f"answer {s}.{i} &"}
                f.write(json.dumps({**row, "reward": s / steps, "reward/format": 1.0}) + "\n")
    (run / "eval_before.json").write_text(
        json.dumps({"summary": {"accuracy": 0.2}, "examples": [{"prompt": XSS, "correct": False}]})
    )
    (run / "eval_after.json").write_text(json.dumps({"accuracy": 0.2 + beta}))
    results = {"final": {"loss": 0.5}, "entries": [{"model": XSS, "accuracy": 0.3}]}
    (run / "results.json").write_text(json.dumps(results))
    return run


# ---- tests -----------------------------------------------------------------------------------


def test_browser_check_catches_errors_and_broken_images(browser, tmp_path):
    """The harness itself: a page with a missing image and a console error fails the check."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img alt="gone" src="missing.png"><script>console.error("boom")</script></body></html>'
    )
    facts = browser.check(bad)
    assert facts["broken"] == ["gone"]
    assert any("boom" in e for e in facts["errors"])
    assert any("missing.png" in e for e in facts["errors"])  # the failed load is logged too


def test_report_from_a_run_directory(browser, tmp_path, capsys):
    run = fake_run(tmp_path, "grpo-a", beta=0.05)
    # two points: a metric logged once is a number, not a chart (plots.logged_once)
    figure = plot_records([{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}], tmp_path / "fig")[0]
    shutil.copy(figure, run / "comparison.png")  # a figure a command left in the run directory
    assert main(["report", str(run)]) == 0
    out = run / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    pngs = sorted(p.name for p in (run / "plots").glob("*.png"))
    groups = ("reward", "kl", "loss", "entropy", "length", "lr", "time", "eval", "other")
    assert pngs == sorted(f"{g}.png" for g in groups)
    text = out.read_text()
    # every section, and model output shown as text, never as markup
    for h in ("Summary", "What the config implies", "Evaluation", "Training curves"):
        assert f"<h2>{h}</h2>" in text
    assert "Sample generations" in text and "Resolved config" in text
    assert XSS not in text and "&lt;script&gt;console.error(&#x27;xss&#x27;)" in text
    facts = browser.check(out)
    assert_clean(facts, images=len(pngs) + 1)
    assert facts["title"] == "posttrain report: grpo-a"
    assert "results.json" in facts["text"] and re.search(r"final/loss\s+0\.5", facts["text"])
    # implied numbers: 2 prompts x 4 samples = 8 samples per step, 8 x 16 = 128 tokens
    assert re.search(r"samples per step\s+8\b", facts["text"])
    assert re.search(r"completion tokens per step \(at most\)\s+128\b", facts["text"])
    # samples table: 4 steps spread over 2..12, 4 rows each; eval before/after with the change
    assert "at steps 2, 6, 8, 12" in facts["text"]
    assert facts["text"].count("answer 12.") == 4 and "answer 12.4" not in facts["text"]
    assert re.search(r"accuracy\s+0\.2\s+0\.25\s+0\.05", facts["text"])


def test_report_out_option_and_errors(tmp_path):
    run = fake_run(tmp_path, "r", beta=0.1, steps=3)
    (run / "samples.jsonl").unlink()
    for f in run.glob("eval_*.json"):
        f.unlink()
    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", str(run), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Sample generations" not in text and "<h2>Evaluation</h2>" not in text
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nope")])
    assert e.value.code == 2


def test_compare_runs_on_the_same_axes(browser, tmp_path):
    runs = [fake_run(tmp_path, f"kl-{b}", beta=b) for b in (0.01, 0.1, 0.5)]
    assert main(["compare", *map(str, runs)]) == 0
    out = tmp_path / "compare.html"
    pngs = list((tmp_path / "compare_plots").glob("*.png"))
    assert len(pngs) == 9
    facts = browser.check(out)
    assert_clean(facts, images=9)
    # labelled by the config key that differs; summary table has final and best values
    for b in (0.01, 0.1, 0.5):
        assert f"kl_coef={b}" in facts["text"]
    assert re.search(r"kl_coef=0\.5\s+\S+kl-0\.5\s+12\s+1\s+1\b", facts["text"])  # reward 1 / 1

    # --metric keeps only the named curves; an unknown one is a clear error
    out2 = tmp_path / "sub" / "kl.html"
    assert main(["compare", *map(str, runs), "--metric", "kl", "--out", str(out2)]) == 0
    assert [p.name for p in (out2.parent / "kl_plots").glob("*.png")] == ["kl.png"]
    assert_clean(browser.check(out2), images=1)
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs[0]), "--metric", "nope", "--out", str(out2)])
    assert e.value.code == 2


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from posttrain.config import RunConfig
    from posttrain.runs import Run

    run = Run.start(RunConfig(out_dir=str(tmp_path), name="tb", tensorboard=True), "sft")
    for step in (1, 2, 3):
        run.log(step, {"loss": 1.0 / step, "reward.total": 2.0 * step, "note": "x"}, echo=False)
    run.close()
    events = list((run.path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "reward/total"]
    got = [(e.step, e.value) for e in acc.Scalars("loss")]
    assert got == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_report_of_a_real_training_run(browser, tiny_dir, tmp_path):
    """A few PPO steps on the tiny model: whatever keys it logs end up plotted and displayed."""
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def reward(prompts, completions, batch):\n    return [len(c) / 10 for c in completions]\n"
    )
    args = [
        "ppo", "--model.name", str(tiny_dir), "--task.name", "unit_conversion",
        "--task.strategy", "direct", "--task.train_size", "8",
        "--reward.components", f"python:{reward}:reward", "--gen.max_new_tokens", "6",
        "--batch_size", "2", "--num_minibatches", "1", "--update_epochs", "1", "--steps", "3",
        "--run.out_dir", str(tmp_path), "--run.name", "ppo", "--run.progress", "false",
        "--run.sample_every", "1", "--run.threads", "1",
    ]  # fmt: skip
    assert main(args) == 0
    run = tmp_path / "ppo"
    assert main(["report", str(run)]) == 0
    pngs = list((run / "plots").glob("*.png"))
    assert {"reward.png", "kl.png", "loss.png", "time.png"} <= {p.name for p in pngs}
    facts = browser.check(run / "report.html")
    assert_clean(facts, images=len(pngs))
    assert re.search(r"optimizer updates per rollout\s+1\b", facts["text"])
    assert "Sample generations" in facts["text"]


# ---- #17: eval runs, steps, sweeps, metrics logged once, tool calls --------------------------


def test_report_counts_steps_not_log_lines_and_shows_once_metrics_as_numbers(tmp_path):
    from posttrain.report import build_report

    run = tmp_path / "sft-2"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"command": "sft", "started": 1.7e9}))
    recs = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5},
        {"step": 2, "eval_loss": 1.6},
        {"step": 2, "rft/mean_reward": 0.4},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    page = build_report(run).read_text()
    assert "steps: 2 (4 records in metrics.jsonl)" in page
    assert "<h2>Logged once</h2>" in page and "rft/mean_reward" in page
    assert (
        not (run / "plots" / "other.png").exists() and not (run / "plots" / "reward.png").exists()
    )


def test_report_of_an_eval_run_shows_results_and_no_training(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tiny_dir), "--task", "unit_conversion", "--limit=2"]
    assert main(argv + ["--max_new_tokens=2", "--run.name=ev", "--run.progress=false"]) == 0
    assert main(["report", "runs/ev"]) == 0
    page = (tmp_path / "runs" / "ev" / "report.html").read_text()
    assert "<h2>Results</h2>" in page and "accuracy" in page and 'alt="results"' in page
    for training in ("optimizer updates", "metrics.jsonl is empty", "Training curves", "Summary"):
        assert training not in page


def test_compare_a_sweep_folder_with_its_own_png(tmp_path, capsys):
    sweep = tmp_path / "dpo-sweep"
    for beta in (0.1, 0.5):
        fake_run(sweep, f"beta_{beta}", beta)
    (sweep / "beta_sweep.png").write_bytes(b"\x89PNG not a run")
    args = sorted(str(p) for p in sweep.glob("beta_*"))  # what the shell expands beta_* to
    assert main(["compare", *args]) == 0
    page = (sweep / "compare.html").read_text()
    assert "kl_coef=0.1" in page and "kl_coef=0.5" in page
    assert '<td class="num">12</td>' in page  # steps, not log lines


def test_samples_with_tool_calls_show_calls_and_results_apart(tmp_path):
    from posttrain.report import build_report

    run = fake_run(tmp_path, "tools", 0.1, steps=2)
    call = {"tool": "calculator", "call": "37 * 1.609344", "result": "59.545728", "error": None}
    bad = {"tool": "calculator", "call": "1/0", "result": None, "error": "division by zero"}
    rec = {"step": 2, "prompt": "p", "completion": "<answer>59.5</answer>", "reward": 1.0}
    with open(run / "samples.jsonl", "w") as f:
        f.write(json.dumps({**rec, "tool_calls": [call, bad]}) + "\n")
    page = build_report(run).read_text()
    assert "<th>tool calls</th>" in page and "<table class='tools'>" in page
    assert "<td class='text result'>59.545728</td>" in page
    assert "error: division by zero" in page
    assert "&quot;tool&quot;" not in page  # not dumped as JSON into the completion's row
