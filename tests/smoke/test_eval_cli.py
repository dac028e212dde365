"""`posttrain eval` through the CLI on the tiny model, and the Python API."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main


def _run_dir(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return run


def test_eval_strategies_side_by_side(tiny_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(
        [
            "eval", "--task", "unit_conversion", "--model", str(tiny_dir),
            "--strategy", "cot", "--strategy", "self_consistency", "--split", "test",
            "--limit", "3", "--max_new_tokens", "4", "--prompting.samples=2",
            "--run.out_dir", str(out), "--run.progress=false", "--run.threads=1",
        ]
    )  # fmt: skip
    assert rc == 0
    run = _run_dir(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "unit_conversion"
    assert [e["strategy"] for e in summary["entries"]] == ["cot", "self_consistency"]
    assert all(0 <= e["accuracy"] <= 1 and e["examples"] == 3 for e in summary["entries"])
    lines = [json.loads(x) for x in (run / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 6
    assert {"model", "strategy", "prompt", "completion", "parsed", "correct", "answer"} <= set(
        lines[0]
    )
    assert len(lines[-1]["trace"]) == 2  # the two sampled paths
    assert (run / "comparison.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "answer_rate" in printed and "self_consistency" in printed


def test_eval_two_models_sentiment_and_summarization(tiny_dir, tmp_path):
    out = tmp_path / "runs"
    rc = main(
        [
            "eval", "--task", "sentiment", "--model", str(tiny_dir), "--model", str(tiny_dir),
            "--limit", "4", "--max_new_tokens", "5", "--run.out_dir", str(out),
            "--run.progress=false", "--run.name", "sent",
        ]
    )  # fmt: skip
    assert rc == 0
    entries = json.loads((out / "sent" / "summary.json").read_text())["entries"]
    assert len(entries) == 2 and entries[0]["reward_mean"] == pytest.approx(
        entries[1]["reward_mean"]
    )
    assert (out / "sent" / "comparison.png").exists()
    rc = main(
        [
            "eval", "--task", "summarization", "--model", str(tiny_dir), "--limit", "2",
            "--max_new_tokens", "5", "--task.article_tokens=30", "--run.out_dir", str(out),
            "--run.progress=false", "--run.name", "summ",
        ]
    )  # fmt: skip
    assert rc == 0
    (entry,) = json.loads((out / "summ" / "summary.json").read_text())["entries"]
    assert {"rouge1", "rouge2", "rougeL", "length_mean", "compression"} <= set(entry)


def test_eval_with_adapter(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "runs"
    rc = main(
        [
            "eval", "--model", str(tiny_dir), "--adapter", str(tmp_path / "adapter"),
            "--strategy", "direct", "--limit", "2", "--max_new_tokens", "3",
            "--run.out_dir", str(out), "--run.progress=false",
        ]
    )  # fmt: skip
    assert rc == 0
    (entry,) = json.loads((_run_dir(out) / "summary.json").read_text())["entries"]
    assert entry["model"].endswith("+adapter")


def test_eval_errors(tiny_dir, tmp_path, capsys):
    rc = main(
        ["eval", "--model", str(tiny_dir), "--strategy", "magic", "--run.out_dir", str(tmp_path)]
    )
    assert rc == 2 and "unknown strategy 'magic'" in capsys.readouterr().err
    rc = main(
        ["eval", "--task", "sentiment", "--model", str(tiny_dir), "--strategy", "cot",
         "--limit", "1", "--run.out_dir", str(tmp_path), "--run.progress=false"]
    )  # fmt: skip
    assert rc == 2 and "needs question/answer rows" in capsys.readouterr().err


def test_python_api(tiny):
    from posttrain.evaluate import evaluate
    from posttrain.tasks import TaskConfig, load_task

    model, tok = tiny
    task = load_task(TaskConfig(train_size=10, validation_size=5, test_size=5))
    summary, rows = evaluate(
        model, tok, task, strategy="few_shot", split="validation", limit=3, max_new_tokens=4
    )
    assert summary["examples"] == 3 and set(summary) >= {"accuracy", "answer_rate", "seconds"}
    assert len(rows) == 3 and rows[0]["prompt"] == task.rows("validation")[0]["question"]
    # greedy evaluation is deterministic
    again, rows2 = evaluate(
        model, tok, task, strategy="few_shot", split="validation", limit=3, max_new_tokens=4
    )
    assert [r["completion"] for r in rows] == [r["completion"] for r in rows2]
    # few-shot examples picked per question from the whole train split
    from posttrain.prompting import PromptingConfig

    near, _ = evaluate(
        model, tok, task, strategy="few_shot", split="validation", limit=2, max_new_tokens=2,
        prompting=PromptingConfig(examples="nearest"),
    )  # fmt: skip
    assert near["examples"] == 2


@pytest.mark.parametrize("name", ["unit_conversion", "sentiment", "summarization"])
def test_shipped_eval_configs_load(name):
    from pathlib import Path

    from posttrain.config import load_config
    from posttrain.evaluate import Config

    path = Path(__file__).resolve().parents[2] / "configs" / f"eval_{name}.toml"
    cfg = load_config(Config, path, ["--model", "x"])
    assert cfg.task.name == name and cfg.models == ["x"]
