"""Commands with `--tools.names calculator` on the tiny model: tool results in training data get no
loss, generation during evaluation may call the tools, samples record the calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import posttrain.rollout
from posttrain.cli import main
from posttrain.runs import read_jsonl

TOOL_PAIRS = [
    {
        "prompt": f"What is {a} * {b}? ",
        "completion": f"<calc>{a} * {b}</calc> = {a * b}\n<answer>{a * b}</answer>",
    }  # fmt: skip
    for a, b in [(3, 4), (6, 7), (2, 5), (8, 9)]
]


@pytest.fixture()
def tool_pairs(tmp_path) -> Path:
    path = tmp_path / "tool_pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in TOOL_PAIRS))
    return path


@pytest.fixture()
def spy_generate(monkeypatch):
    """Wraps rollout.generate and records the `tools` of every call."""
    calls: list = []
    real = posttrain.rollout.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("tools"))
        return real(*args, **kwargs)

    monkeypatch.setattr(posttrain.rollout, "generate", spy)
    return calls


def _run_dir(out: Path) -> Path:
    (path,) = [p for p in out.iterdir() if p.is_dir()]
    return path


def _sft_tokens(tiny_dir, out, data, *extra) -> int:
    argv = [
        "sft", "--model.name", str(tiny_dir), "--data.source", str(data),
        "--data.validation_size=0", "--train.batch_size=4", "--train.max_steps=1",
        "--run.out_dir", str(out), "--run.threads=1", "--run.progress=false", *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return read_jsonl(_run_dir(out) / "metrics.jsonl")[0]["tokens"]


def test_sft_takes_no_loss_on_tool_results(tiny_dir, tool_pairs, tmp_path):
    """The results " = 12\n", " = 42\n", " = 10\n", " = 72\n" are, in the tiny tokenizer,
    [' =', ' 1', '2', '\n'], [' =', ' ', '4', '2', '\n'], [' =', ' 1', '0', '\n'],
    [' =', ' ', '7', '2', '\n']: 4 + 5 + 4 + 5 = 18 tokens. The labelled tokens of the one step
    (all four examples) fall by exactly 18 with the calculator named."""
    plain = _sft_tokens(tiny_dir, tmp_path / "plain", tool_pairs)
    masked = _sft_tokens(tiny_dir, tmp_path / "tools", tool_pairs, "--tool", "calculator")
    assert plain - masked == 18
    config = (_run_dir(tmp_path / "tools") / "config.toml").read_text()
    assert "[tools]" in config and '"calculator"' in config


def test_sft_test_eval_uses_the_tools(tiny_dir, tmp_path, monkeypatch, spy_generate):
    from test_sft import FakeTask

    import posttrain.tasks

    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: FakeTask())
    argv = [
        "sft", "--model.name", str(tiny_dir), "--train.max_steps=1", "--train.batch_size=3",
        "--eval_limit=2", "--eval_max_new_tokens=4", "--run.out_dir", str(tmp_path),
        "--run.progress=false", "--tools.names", "calculator",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(spy_generate) == 1 and spy_generate[0].tools.keys() == {"calc"}


def test_eval_cli_gives_every_strategy_the_tools(tiny_dir, tmp_path, spy_generate):
    argv = [
        "eval", "--task", "unit_conversion", "--model", str(tiny_dir), "--strategy", "cot",
        "--strategy", "self_reflection", "--limit", "2", "--max_new_tokens", "4",
        "--tool", "calculator", "--run.out_dir", str(tmp_path), "--run.progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(spy_generate) == 4  # cot: 1 call; self_reflection: answer, critique, revision
    assert all(t is not None and t.tools.keys() == {"calc"} for t in spy_generate)
    lines = read_jsonl(_run_dir(tmp_path) / "results.jsonl")
    assert len(lines) == 4 and all(isinstance(r["tool_calls"], list) for r in lines)


def test_rft_samples_with_tools_and_records_calls(tiny_dir, tmp_path, monkeypatch, spy_generate):
    import torch
    from test_sft import FakeTask

    import posttrain.tasks

    class AnyTask(FakeTask):
        def reward(self, prompts, completions, batch):
            return torch.ones(len(completions))

    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: AnyTask())
    argv = [
        "rft", "--model.name", str(tiny_dir), "--k=2", "--questions=2", "--gen.max_new_tokens=4",
        "--train.max_steps=1", "--train.batch_size=2", "--eval_limit=2",
        "--eval_max_new_tokens=4", "--lora.r=4", "--tool", "calculator",
        "--run.out_dir", str(tmp_path), "--run.progress=false", "--run.threads=1",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(spy_generate) == 2 and all(t.tools.keys() == {"calc"} for t in spy_generate)
    samples = read_jsonl(_run_dir(tmp_path) / "samples.jsonl")
    assert len(samples) == 4 and all(isinstance(s["tool_calls"], list) for s in samples)


def test_distill_with_tools(tiny_dir, tool_pairs, tmp_path):
    argv = [
        "distill", "--model.name", str(tiny_dir), "--teacher.name", str(tiny_dir),
        "--data.source", str(tool_pairs), "--data.validation_size=0", "--train.batch_size=4",
        "--train.max_steps=1", "--tool", "calculator", "--run.out_dir", str(tmp_path),
        "--run.progress=false", "--run.threads=1",
    ]  # fmt: skip
    assert main(argv) == 0
    (rec,) = [r for r in read_jsonl(_run_dir(tmp_path) / "metrics.jsonl") if "loss" in r]
    # the same 18 result tokens as in sft are left out (see test_sft_takes_no_loss_on_tool_results)
    plain = sum(
        len(tok_ids) + 1
        for tok_ids in _completion_ids(tiny_dir, [r["completion"] for r in TOOL_PAIRS])
    )
    assert rec["tokens"] == plain - 18


def _completion_ids(tiny_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_dpo_with_tool_pairs(tiny_dir, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": r["prompt"], "chosen": r["completion"], "rejected": " I do not know."}
        for r in TOOL_PAIRS
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    argv = [
        "dpo", "--model.name", str(tiny_dir), "--data.source", str(path),
        "--data.eval_fraction=0", "--batch_size=2", "--max_steps=2", "--tool", "calculator",
        "--run.out_dir", str(tmp_path / "runs"), "--run.progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    metrics = [r for r in read_jsonl(_run_dir(tmp_path / "runs") / "metrics.jsonl") if "loss" in r]
    assert len(metrics) == 2 and all(r["loss"] == r["loss"] for r in metrics)  # finite
    info = json.loads((_run_dir(tmp_path / "runs") / "final" / "posttrain.json").read_text())
    assert info["command"] == "dpo" and info["task"] is None and info["strategy"] is None
    assert info["tools"]["names"] == ["calculator"] and info["chat"] is False


def test_dpo_builds_pairs_with_tools(tiny_dir, tmp_path, spy_generate):
    argv = [
        "dpo", "--model.name", str(tiny_dir), "--build.enabled=true", "--build.prompts=4",
        "--build.n=2", "--build.min_gap=-1", "--build.max_new_tokens=4", "--build.only=true",
        "--tool", "calculator", "--run.out_dir", str(tmp_path), "--run.progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    assert len(spy_generate) == 1 and spy_generate[0].tools.keys() == {"calc"}
    pairs = read_jsonl(_run_dir(tmp_path) / "pairs.jsonl")
    assert pairs and all(isinstance(p["chosen_tool_calls"], list) for p in pairs)


def test_generate_with_tools_records_calls(tiny_dir, tmp_path, spy_generate):
    out = tmp_path / "out.jsonl"
    argv = [
        "generate", "--model", str(tiny_dir), "--prompt", "What is 3 * 4? ", "--n", "2",
        "--gen.temperature=1.0", "--gen.max_new_tokens=4", "--tool", "calculator",
        "--output", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert spy_generate[0].tools.keys() == {"calc"}
    lines = read_jsonl(out)
    assert len(lines) == 2 and all(r["tool_calls"] == [] for r in lines)


def test_trained_folder_remembers_its_format_and_eval_uses_it(
    tiny_dir, tmp_path, monkeypatch, spy_generate
):
    """sft on the task's rows with the direct template and the calculator writes
    final/posttrain.json; `eval --adapter final` on another question file (a custom task) then
    prompts with the direct format ("{question} ", no chat template) and calls the calculator,
    with no --strategy or --tool given; --strategy on the command line wins."""
    from test_sft import FakeTask

    import posttrain.tasks

    real_load_task = posttrain.tasks.load_task
    monkeypatch.setattr(posttrain.tasks, "load_task", lambda cfg: FakeTask())
    argv = [
        "sft", "--model.name", str(tiny_dir), "--train.max_steps=1", "--train.batch_size=3",
        "--eval_limit=0", "--tool", "calculator", "--run.out_dir", str(tmp_path / "sft"),
        "--run.progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    final = _run_dir(tmp_path / "sft") / "final"
    info = json.loads((final / "posttrain.json").read_text())
    assert info["command"] == "sft" and info["strategy"] == "direct" and info["chat"] is False
    assert info["prompt_template"] == "{question} " and info["task"]["name"] == "unit_conversion"
    assert info["tools"]["names"] == ["calculator"] and info["tools"]["format"] == "tag"

    monkeypatch.setattr(posttrain.tasks, "load_task", real_load_task)
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "\n".join(json.dumps({"q": f"What is {a} * 7?", "a": a * 7}) for a in range(1, 9))
    )
    prompts: list = []
    real = posttrain.rollout.generate

    def spy(model, tok, batch, *args, **kwargs):
        prompts.extend(batch)
        spy_generate.append(kwargs.get("tools"))
        return real(model, tok, batch, *args, **kwargs)

    monkeypatch.setattr(posttrain.rollout, "generate", spy)
    base = [
        "eval", "--model", str(tiny_dir), "--adapter", str(final), "--task", "custom",
        "--task.source", str(questions), "--task.prompt_column", "q", "--task.answer_column", "a",
        "--split", "test", "--limit", "2", "--max_new_tokens", "3", "--run.progress=false",
    ]  # fmt: skip
    assert main([*base, "--run.out_dir", str(tmp_path / "eval")]) == 0
    (entry,) = json.loads((_run_dir(tmp_path / "eval") / "summary.json").read_text())["entries"]
    assert entry["strategy"] == "direct" and entry["examples"] >= 1
    assert all(
        isinstance(p, str) and p.startswith("What is ") and p.endswith("? ") for p in prompts
    )
    assert spy_generate and all(t is not None and "calc" in t.tools for t in spy_generate)

    prompts.clear()
    spy_generate.clear()
    argv = [
        *base,
        "--strategy",
        "cot",
        "--trained_format=false",
        "--run.out_dir",
        str(tmp_path / "e2"),
    ]
    assert main(argv) == 0
    (entry,) = json.loads((_run_dir(tmp_path / "e2") / "summary.json").read_text())["entries"]
    assert entry["strategy"] == "cot" and all(t is None for t in spy_generate)


@pytest.mark.parametrize("command", ["reinforce", "rloo"])
def test_online_final_folder_records_its_format(tiny_dir, tmp_path, monkeypatch, command):
    from rl_fakes import REWARD_PY, use_fake_task

    use_fake_task(monkeypatch)
    reward = tmp_path / "reward.py"
    reward.write_text(REWARD_PY)
    argv = [
        command, "--model.name", str(tiny_dir), "--steps=1", "--batch_size=2",
        "--eval_limit=0", f"--reward.components=python:{reward}:e_rate", "--tool", "calculator",
        "--gen.system_prompt", "Be brief.", "--run.out_dir", str(tmp_path / "runs"),
        "--run.progress=false",
    ]  # fmt: skip
    assert main(argv) == 0
    info = json.loads((_run_dir(tmp_path / "runs") / "final" / "posttrain.json").read_text())
    assert info["command"] == command and info["strategy"] == "cot"
    assert info["system_prompt"] == "Be brief." and info["tools"]["names"] == ["calculator"]
