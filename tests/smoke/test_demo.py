"""`posttrain demo` (the README's main command) runs end to end on the tiny model: baseline,
RFT, the before/after table and the report, through the CLI.

The random tiny model never answers correctly, so the task's reward is replaced by one that
marks every sample correct: the test checks the pipeline, not the accuracy (measured in the
closing notes on the real model)."""

from __future__ import annotations

import json

import torch

from posttrain.cli import main
from posttrain.tasks.unit_conversion import UnitConversionTask


def test_demo_runs_end_to_end(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        UnitConversionTask,
        "reward",
        lambda self, prompts, completions, batch: torch.ones(len(completions)),
    )
    out = tmp_path / "runs"
    rc = main(["demo", "--model", str(tiny_dir), "--questions=4", "--k=2", "--eval_limit=2",
               "--epochs=1", "--run.out_dir", str(out), "--run.name=demo", "--run.progress=false",
               "--run.threads=1"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    run = out / "demo"
    assert (run / "report.html").is_file() and str(run / "report.html") in text
    before = json.loads((run / "eval_before.json").read_text())["summary"]
    assert {"direct/accuracy", "few_shot/accuracy"} <= set(before)
    assert "[4/4] report" in text
    assert (run / "final" / "adapter_config.json").is_file()  # RFT trained and saved an adapter
