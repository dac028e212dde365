"""`posttrain demo` (the README's main command) runs end to end on the tiny model: the baselines
with and without the calculator, SFT on worked solutions with calculator calls, the before/after
table with transcripts and the report, through the CLI. The random tiny model never answers
correctly: the test checks the pipeline, not the accuracy (measured in docs/tools.md)."""

from __future__ import annotations

import json

from posttrain.cli import main


def test_demo_runs_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["demo", "--model", str(tiny_dir), "--examples=8", "--eval_limit=2",
               "--batch_size=4", "--run.out_dir", str(out), "--run.name=demo",
               "--run.progress=false", "--run.threads=1"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0
    run = out / "demo"
    assert (run / "report.html").is_file() and str(run / "report.html") in text
    before = json.loads((run / "eval_before.json").read_text())["summary"]
    assert {"accuracy", "answer_rate", "few_shot/accuracy", "few_shot+calculator/accuracy"} <= set(
        before
    )
    after = json.loads((run / "eval_after.json").read_text())
    assert {"accuracy", "answer_rate"} <= set(after["summary"])  # the same keys as before
    assert all("tool_calls" in r for r in after["examples"])  # transcripts keep their calls
    assert "[4/4] report" in text
    final = run / "final"
    assert (final / "adapter_config.json").is_file()  # SFT trained and saved an adapter
    trained = json.loads((final / "posttrain.json").read_text())
    assert trained["tools"]["names"] == ["calculator"] and trained["strategy"] == "direct"
