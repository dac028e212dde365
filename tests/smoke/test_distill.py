"""`posttrain distill` on tiny models: the KL to the teacher falls; mismatched tokenizers fail."""

from __future__ import annotations

import json

from posttrain.cli import main
from posttrain.runs import read_jsonl

PAIRS = [
    {"prompt": "How many grams are there per 6 kg? ", "completion": "<answer>6000</answer>"},
    {"prompt": "Convert 3 feet to inches. ", "completion": "<answer>36</answer>"},
    {"prompt": "The movie was ", "completion": "great fun"},
    {"prompt": "hello world ", "completion": "what is the capital of France? Paris."},
]


def _student(tmp_path, vocab_size=320):
    from conftest import build_model, build_tokenizer

    tok = build_tokenizer(vocab_size)
    path = tmp_path / f"student-{vocab_size}"
    build_model(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _argv(student, teacher, data, out, *extra):
    return [
        "distill", "--model.name", str(student), "--teacher.name", str(teacher),
        "--data.source", str(data), "--data.validation_size=0", "--train.batch_size=4",
        "--run.out_dir", str(out), "--run.progress=false", "--run.threads=1",
        "--optim.warmup_steps=0", "--optim.schedule=constant", *extra,
    ]  # fmt: skip


def test_student_moves_towards_the_teacher(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS))
    out = tmp_path / "runs"
    argv = _argv(
        _student(tmp_path), tiny_dir, data, out,
        "--weight=1.0", "--temperature=2.0", "--lora.enabled=false", "--optim.lr=1e-2",
        "--train.max_steps=15",
    )  # fmt: skip
    assert main(argv) == 0
    (run,) = list(out.iterdir())
    metrics = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert {"ce", "kl", "loss", "lr", "grad_norm", "tokens"} <= set(metrics[0])
    assert metrics[0]["kl"] > 0
    assert metrics[-1]["kl"] < 0.5 * metrics[0]["kl"], [m["kl"] for m in metrics]
    # w = 1, T = 2: loss = 4 * kl
    assert abs(metrics[0]["loss"] - 4 * metrics[0]["kl"]) < 1e-5
    assert (run / "final" / "config.json").is_file()


def test_reverse_kl_with_lora_runs(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS))
    out = tmp_path / "runs"
    argv = _argv(_student(tmp_path), tiny_dir, data, out, "--kl=reverse", "--train.max_steps=2")
    assert main(argv) == 0
    (run,) = list(out.iterdir())
    assert (run / "final" / "adapter_config.json").is_file()


def test_tokenizer_mismatch_is_a_clear_error(tiny_dir, tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS))
    argv = _argv(_student(tmp_path, vocab_size=300), tiny_dir, data, tmp_path / "runs")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "do not share a tokenizer" in err and "300" in err
