"""Under `accelerate launch` with 2 processes only the main process prints (#17): sft's example
count and its "saved the adapter" line appear once, not once per process. Launched like
test_multiprocess.py (configs/accelerate/cpu_2proc.yaml: gloo on the CPU)."""

from __future__ import annotations

import json

from test_multiprocess import SFT_ROWS, launch


def test_two_processes_print_each_line_once(tiny_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    argv = [
        "sft", "--model.name", str(tiny_dir), "--data.source", str(data),
        "--data.validation_size=0", "--lora.enabled=true", "--train.batch_size=2",
        "--train.max_steps=1", "--run.out_dir", str(tmp_path / "runs"), "--run.name", "lora",
        "--run.progress=false", "--run.threads=1",
    ]  # fmt: skip
    out = launch({"sft": argv}, tmp_path)
    status = [tmp_path / f"status_{rank}.json" for rank in (0, 1)]
    ran = [json.loads(f.read_text()) if f.is_file() else {} for f in status]
    assert ran == [{"sft": 0}, {"sft": 0}], f"{ran}\n{out[-4000:]}"
    lines = out.splitlines()
    counts = {
        "example count": sum(line.startswith("sft: 4 train / 0 validation") for line in lines),
        "saved the adapter": sum(line.startswith("saved the adapter to") for line in lines),
    }
    assert counts == {"example count": 1, "saved the adapter": 1}, f"{counts}:\n{out[-4000:]}"
