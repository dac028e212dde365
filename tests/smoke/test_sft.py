"""`posttrain sft` on the tiny model: LoRA and full runs, over-fitting, exact resume, task data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.runs import read_jsonl

PAIRS = [
    {"prompt": "How many grams are there per 6 kg? ", "completion": "<answer>6000</answer>"},
    {"prompt": "Convert 3 feet to inches. ", "completion": "<answer>36</answer>"},
    {"prompt": "How many grams are there per 2 kg? ", "completion": "<answer>2000</answer>"},
    {"prompt": "Convert 1 feet to inches. ", "completion": "<answer>12</answer>"},
]


@pytest.fixture()
def pairs(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS))
    return path


def _sft(tiny_dir, out, data, *extra) -> int:
    return main(
        [
            "sft",
            "--model.name", str(tiny_dir),
            "--data.source", str(data),
            "--data.validation_size=0",
            "--train.batch_size=2",
            "--optim.grad_accum=2",
            "--optim.warmup_steps=0",
            "--run.out_dir", str(out),
            "--run.threads=1",
            "--run.progress=false",
            *extra,
        ]
    )  # fmt: skip


def _run_dir(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return path


def test_overfits_four_examples(tiny_dir, pairs, tmp_path):
    out = tmp_path / "runs"
    args = ["--lora.enabled=false", "--optim.lr=1e-2", "--optim.schedule=constant"]
    assert _sft(tiny_dir, out, pairs, *args, "--train.max_steps=30") == 0
    run = _run_dir(out)
    metrics = read_jsonl(run / "metrics.jsonl")
    losses = [r["loss"] for r in metrics if "loss" in r]
    assert len(losses) == 30
    assert losses[-1] < 0.1 * losses[0], losses
    assert {"loss", "lr", "grad_norm", "tokens", "seconds", "epoch"} <= set(metrics[0])
    assert metrics[0]["tokens"] == 36  # completion tokens of the 4 examples (+ EOS each)
    final = run / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "README.md").is_file() and (final / "tokenizer_config.json").is_file()


def test_lora_changes_only_the_adapter(tiny_dir, pairs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "runs"
    args = ["--lora.enabled=true", "--lora.r=4", "--optim.lr=1e-2", "--train.max_steps=8"]
    assert _sft(tiny_dir, out, pairs, *args) == 0
    run = _run_dir(out)
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0] - 0.05, losses
    final = run / "final"
    assert (final / "adapter_config.json").is_file() and (final / "README.md").is_file()
    assert not (final / "model.safetensors").exists()
    results = json.loads((run / "results.json").read_text())
    assert 0 < results["adapter_size_mb"] < 1

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, final)
    n_base = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, before[key]), name  # base weights untouched
        n_base += 1
    assert n_base == len(before)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero


def test_resume_matches_an_uninterrupted_run(tiny_dir, pairs, tmp_path):
    """Run 4 steps; run again with checkpoints at 2 and 4, delete step 4 (as if killed after
    step 2's checkpoint) and resume: the metrics and final adapter equal the first run's."""
    from safetensors.torch import load_file

    args = ["--lora.enabled=true", "--lora.dropout=0.1", "--train.max_steps=4"]
    assert _sft(tiny_dir, tmp_path / "a", pairs, *args) == 0
    assert _sft(tiny_dir, tmp_path / "b", pairs, *args, "--run.save_every=2") == 0
    a, b = _run_dir(tmp_path / "a"), _run_dir(tmp_path / "b")
    shutil.rmtree(b / "checkpoints" / "step_000004")
    shutil.rmtree(b / "final")
    assert main(["sft", "--config", str(b / "config.toml"), "--run.resume", str(b)]) == 0
    ma = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(a / "metrics.jsonl")]
    mb = [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(b / "metrics.jsonl")]
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    assert ma == mb
    wa = load_file(a / "final" / "adapter_model.safetensors")
    wb = load_file(b / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class FakeTask:
    """Unit-conversion-shaped rows; accuracy = share of completions holding the right answer."""

    name = "fake"

    def rows(self, split):
        n = {"train": 6, "validation": 2, "test": 3}[split]
        off = {"train": 0, "validation": 10, "test": 20}[split]
        return [
            {
                "prompt": f"Convert {i} m to cm.",
                "question": f"Convert {i} m to cm.",
                "answer": i * 100.0,
            }
            for i in range(off + 1, off + n + 1)
        ]

    def evaluate(self, completions, batch):
        ok = [f"<answer>{int(a)}</answer>" in c for c, a in zip(completions, batch["answer"])]
        return {"accuracy": sum(ok) / len(ok), "answer_rate": 1.0}, [{"correct": o} for o in ok]

    def reward(self, prompts, completions, batch):
        return torch.tensor([float("<answer>" in c) for c in completions])


def test_task_recipe_trains_direct_answers_and_reports_accuracy(tiny_dir, tmp_path, monkeypatch):
    import posttrain.tasks

    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: FakeTask())
    out = tmp_path / "runs"
    argv = [
        "sft", "--model.name", str(tiny_dir), "--train.max_steps=3", "--train.batch_size=3",
        "--eval_limit=3", "--eval_max_new_tokens=4", "--run.out_dir", str(out),
        "--run.progress=false", "--output", str(tmp_path / "sft_model"),
    ]  # fmt: skip
    assert main(argv) == 0
    run = _run_dir(out)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert any("eval_loss" in r for r in metrics)
    assert any("test_accuracy" in r for r in metrics)
    card = (run / "final" / "README.md").read_text()
    assert "test accuracy" in card and "[train]" in card
    assert (tmp_path / "sft_model" / "adapter_config.json").is_file()


def test_conversations_and_plain_text_through_the_cli(tiny_dir, tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": f"world {i}"},
            ]
        }
        for i in range(4)
    ]
    chats.write_text("\n".join(json.dumps(r) for r in rows))
    assert _sft(tiny_dir, tmp_path / "a", chats, "--train.max_steps=2") == 0
    rec = read_jsonl(_run_dir(tmp_path / "a") / "metrics.jsonl")[0]
    # labels: "world", " <i>", "<|im_end|>", "\n" per conversation (BPE may merge; at least 3 each)
    assert rec["tokens"] >= 12

    text = tmp_path / "text.csv"
    text.write_text("text\nthe quick brown fox\nhello world\nthe movie was great\nfun\n")
    assert _sft(tiny_dir, tmp_path / "b", text, "--train.max_steps=1") == 0
