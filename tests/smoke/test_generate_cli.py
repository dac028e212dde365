"""`posttrain generate` and the embedded default model."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main


def test_generate_cli_prompts_and_file(tiny_dir, tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--prompt",
                "hello",
                "--prompt",
                "The movie",
                "--gen.max_new_tokens=5",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in lines] == ["hello", "The movie"]
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["a b", "c d", "e f"]))
    out = tmp_path / "out.jsonl"
    args = [
        "generate",
        "--model",
        str(tiny_dir),
        "--input",
        str(src),
        "--column",
        "text",
        "--n",
        "2",
    ]
    assert (
        main(args + ["--temperature", "0.8", "--output", str(out), "--gen.max_new_tokens=4"]) == 0
    )
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 6 and {r["sample"] for r in recs} == {0, 1}


def test_generate_cli_errors(tiny_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_dir)]) == 2
    assert "no prompts" in capsys.readouterr().err
    src = tmp_path / "p.csv"
    src.write_text("text\nhello\n")
    assert (
        main(["generate", "--model", str(tiny_dir), "--input", str(src), "--column", "prompt"]) == 2
    )
    assert "no column 'prompt'" in capsys.readouterr().err
    assert main(["generate", "--modle", "x"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 2


def test_help_lists_every_command(capsys):
    from posttrain.cli import COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert main(["generate", "--help"]) == 0
    assert "--gen.temperature" in capsys.readouterr().out


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, posttrain, posttrain.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.slow
def test_embedded_default_chat_reply(capsys):
    """The embedded SmolLM2-135M-Instruct resolves, converts once, and answers sensibly."""
    from posttrain.models import load_model
    from posttrain.rollout import GenerationConfig, generate

    model, tok = load_model("default")
    assert model.config.num_hidden_layers == 30 and tok.chat_template
    roll = generate(
        model,
        tok,
        ["What is the capital of France?"],
        GenerationConfig(chat=True, temperature=0.0, max_new_tokens=20),
    )
    assert "Paris" in roll.completions[0]
    assert roll.finish_reasons[0] == "eos"


def test_generate_takes_threads(tiny_dir, capsys):
    """README: `--threads=N` for generate, as `--run.threads=N` for the commands that write runs."""
    import torch

    before = torch.get_num_threads()
    try:
        argv = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--threads=1", "--n=1"]
        assert main(argv + ["--gen.max_new_tokens=2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
