"""A run's CPU settings (#16 item 6): threads, autocast and oneDNN apply when a command's main(cfg)
is called from Python as from the CLI, only for the length of the run, and only the policy is
switched to oneDNN (a teacher keeps torch's kernels)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import cpu
from posttrain.algos import distill
from posttrain.config import load_config

PAIRS = [
    {"prompt": "Convert 3 feet to inches. ", "completion": "<answer>36</answer>"},
    {"prompt": "The movie was ", "completion": "great fun"},
]


def _switched(model: torch.nn.Module) -> int:
    return sum(cpu.switched(m) for m in model.modules())


@pytest.fixture()
def spies(monkeypatch):
    """What start() saw (threads, autocast) and the models main loaded (policy, teacher)."""
    import posttrain.models
    import posttrain.train

    seen: dict = {"teachers": []}
    start, load_policy, load_model = (
        posttrain.train.start,
        posttrain.train.load_policy,
        posttrain.models.load_model,
    )

    def spy_start(cfg, command):
        seen["threads"] = torch.get_num_threads()
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        return start(cfg, command)

    def spy_policy(*a, **k):
        seen["policy"], tok = load_policy(*a, **k)
        return seen["policy"], tok

    def spy_model(*a, **k):
        model, tok = load_model(*a, **k)
        seen["teachers"].append(model)
        return model, tok

    monkeypatch.setattr(posttrain.train, "start", spy_start)
    monkeypatch.setattr(posttrain.train, "load_policy", spy_policy)
    monkeypatch.setattr(posttrain.models, "load_model", spy_model)
    return seen


def _cfg(tiny_dir, tmp_path, *extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in PAIRS))
    return load_config(
        distill.Config,
        None,
        [
            f"--model.name={tiny_dir}", f"--teacher.name={tiny_dir}", f"--data.source={data}",
            "--data.validation_size=0", "--train.batch_size=2", "--train.max_steps=1",
            "--eval_limit=0", f"--run.out_dir={tmp_path / 'runs'}", "--run.progress=false",
            *extra,
        ],
    )  # fmt: skip


@pytest.mark.skipif(not cpu.available(), reason="this torch has no oneDNN linear")
def test_python_main_applies_the_run_settings(tiny_dir, tmp_path, spies, monkeypatch):
    monkeypatch.setattr(cpu, "_CHOICES", {})  # run.onednn=auto measures: say oneDNN won
    monkeypatch.setattr(cpu, "_PRINTED", set())
    monkeypatch.setattr(cpu, "_cache_file", lambda: tmp_path / "kernels.json")
    monkeypatch.setattr(cpu, "_timings", lambda shapes: (1.5, 2.0))
    torch.set_num_threads(1)
    cfg = _cfg(tiny_dir, tmp_path, "--run.threads=2", "--run.autocast=bfloat16")
    assert distill.main(cfg) == 0  # no CLI in between
    assert spies["threads"] == 2 and spies["autocast"] is True
    assert _switched(spies["policy"]) > 0  # run.onednn=auto (the default), oneDNN measured faster
    teacher = spies["teachers"][-1]  # loaded after the policy (whose load_model comes first)
    assert teacher is not spies["policy"] and _switched(teacher) == 0  # torch's kernels
    # nothing outlives the run
    assert torch.get_num_threads() == 1 and not torch.is_autocast_enabled("cpu")


def test_onednn_off_leaves_the_policy_alone(tiny_dir, tmp_path, spies):
    assert distill.main(_cfg(tiny_dir, tmp_path, "--run.onednn=false")) == 0
    assert spies["autocast"] is False
    assert _switched(spies["policy"]) == 0
    assert all(_switched(t) == 0 for t in spies["teachers"])


def test_loading_a_model_does_not_switch_it_unless_asked(tiny_dir):
    from posttrain.models import load_model

    assert _switched(load_model(str(tiny_dir))[0]) == 0
    if cpu.available():
        assert _switched(load_model(str(tiny_dir), onednn=True)[0]) > 0
