"""posttrain.cpu: oneDNN linear layers give torch's numbers (forward, gradients, generation), fall
back where they do not apply, survive a deep copy, and touch only models a caller switched; the
malloc setting applies on glibc; a run's CPU settings apply from the CLI and from Python."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from posttrain import cpu
from posttrain.rollout import GenerationConfig, generate

pytestmark = pytest.mark.skipif(not cpu.available(), reason="this torch has no oneDNN linear")


def _layers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 7, bias=False))
    return plain, copy.deepcopy(plain)


def test_forward_and_gradients_match_torch():
    plain, fast = _layers()
    assert cpu.use_onednn(fast) == 2
    assert cpu.use_onednn(fast) == 0  # already switched
    x = torch.randn(3, 5, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = plain(x), fast(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    (y * torch.arange(7.0)).sum().backward()
    (y2 * torch.arange(7.0)).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    for p, q in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)
    # frozen weights (LoRA's base layer): only the input gets a gradient
    fast.requires_grad_(False)
    x3 = x.detach().clone().requires_grad_()
    fast(x3).sum().backward()
    assert x3.grad is not None and fast[0].weight.grad is not None  # kept from before
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)


def test_falls_back_to_torch_under_autocast_and_leaves_unswitched_layers():
    plain, fast = _layers()
    cpu.use_onednn(fast)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(x).dtype == torch.bfloat16
        torch.testing.assert_close(fast(x), plain(x))
    with torch.no_grad(), cpu.packed_linears(plain) as n:  # nobody switched it: left alone
        assert n == 0 and "forward" not in plain[0].__dict__


def test_deep_copy_computes_with_its_own_weights():
    _, fast = _layers()
    cpu.use_onednn(fast)
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        twin[0].weight.zero_()
        twin[0].bias.zero_()
    x = torch.randn(2, 12)
    assert torch.count_nonzero(twin(x)) == 0
    assert torch.count_nonzero(fast(x)) > 0


def test_packed_weights_match_and_are_dropped_on_exit():
    plain, fast = _layers()
    cpu.use_onednn(fast)
    x = torch.randn(6, 12)
    with torch.no_grad():
        with cpu.packed_linears(fast) as n:
            assert n == 2
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
            with torch.enable_grad():  # a recorded forward takes the layer's own path
                assert fast(x.requires_grad_()).requires_grad
        assert fast[0].forward.__func__ is cpu._onednn_forward  # restored
        fast[0].weight.add_(1.0)  # a new weight is read at the next entry
        plain[0].weight.add_(1.0)
        with cpu.packed_linears(fast):
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    assert "forward" not in plain[0].__dict__


def test_generation_is_the_same_with_and_without_onednn(tiny_dir):
    """Greedy and seeded sampling on the tiny Llama: the same tokens, log-probs within fp32 noise."""
    from posttrain.models import load_model

    prompts = ["How many grams", "Convert 3 feet to inches. It is a long prompt"]
    fast, tok = load_model(str(tiny_dir), onednn=True)
    plain, _ = load_model(str(tiny_dir))  # the default: torch's kernels
    assert cpu.switched(fast.lm_head) and "forward" not in plain.lm_head.__dict__
    for cfg, seeds in [
        (GenerationConfig(temperature=0, max_new_tokens=12), None),
        (GenerationConfig(temperature=1.0, max_new_tokens=12, n=3), [4, 9]),
    ]:
        a = generate(fast, tok, prompts, cfg, seeds=seeds)
        b = generate(plain, tok, prompts, cfg, seeds=seeds)
        assert torch.equal(a.completion_ids, b.completion_ids)
        torch.testing.assert_close(a.logp, b.logp, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc setting")
def test_reuse_freed_memory_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert cpu.reuse_freed_memory() is True


def test_the_choice_follows_the_measured_speed_ups():
    """oneDNN for a use only where it measured at least MIN_GAIN x torch's kernel."""
    c = cpu.decide(1.2, 0.9)
    assert (c.train, c.decode) == (True, False)
    c = cpu.decide(cpu.MIN_GAIN - 0.01, 2.0)
    assert (c.train, c.decode) == (False, True)
    text = c.describe()
    assert (
        "training products on torch's kernel" in text
        and "decode steps on oneDNN (oneDNN 2.00x" in text
    )


@pytest.fixture()
def fresh_choice(monkeypatch, tmp_path):
    """An empty kernel-choice cache (in the process and on disk, tmp_path/kernels.json) and a fake
    measurement: set `speedups` to what _timings should return; `calls` counts measurements."""
    monkeypatch.setattr(cpu, "_CHOICES", {})
    monkeypatch.setattr(cpu, "_PRINTED", set())
    monkeypatch.setattr(cpu, "_cache_file", lambda: tmp_path / "kernels.json")
    state = {"speedups": (1.5, 2.0), "calls": 0}

    def timings(shapes):
        state["calls"] += 1
        assert shapes  # the model's own (out, in) shapes with their layer counts
        return state["speedups"]

    monkeypatch.setattr(cpu, "_timings", timings)
    return state


@pytest.mark.parametrize("speedups", [(1.5, 2.0), (0.8, 2.0), (1.5, 0.8), (0.8, 0.8)])
def test_auto_switches_training_and_decoding_as_measured(tiny_dir, fresh_choice, capsys, speedups):
    """run.onednn=auto: the policy's layers run oneDNN in training only where it won, the lean
    decoder and the packed no-grad path only where it won at decode rows, and the choice is
    printed."""
    from posttrain.decoder import LeanDecoder
    from posttrain.models import load_model

    fresh_choice["speedups"] = speedups
    model, _ = load_model(str(tiny_dir), onednn="auto")
    train, decode = (x >= cpu.MIN_GAIN for x in speedups)
    n = sum(cpu.switched(m) for m in model.modules())
    assert (n > 0) == train
    assert cpu.decodes_onednn(model) == decode
    assert LeanDecoder.build(model).onednn == decode
    with cpu.packed_linears(model) as packed:
        assert (packed > 0) == decode
    assert "kernels: training products on " + ("oneDNN" if train else "torch's kernel") in capsys.readouterr().out  # fmt: skip
    # a deep copy (the reference policy) keeps the choice
    assert cpu.decodes_onednn(copy.deepcopy(model)) == decode


def test_auto_measures_once_per_machine_and_shapes(tiny_dir, fresh_choice, tmp_path):
    """The choice is measured once: later loads in the process reuse it, a new process reads
    kernels.json (keyed by CPU, torch version, threads and shapes), and an unreadable file is
    measured again."""
    import json

    from posttrain.models import load_model

    load_model(str(tiny_dir), onednn="auto")
    load_model(str(tiny_dir), onednn="auto")
    assert fresh_choice["calls"] == 1
    saved = json.loads((tmp_path / "kernels.json").read_text())
    (key,) = saved
    assert f"{torch.get_num_threads()} threads" in key and saved[key] == [1.5, 2.0]
    cpu._CHOICES.clear()  # a new process
    fresh_choice["speedups"] = (0.5, 0.5)  # would flip the choice if measured again
    model, _ = load_model(str(tiny_dir), onednn="auto")
    assert fresh_choice["calls"] == 1 and cpu.decodes_onednn(model)
    cpu._CHOICES.clear()
    (tmp_path / "kernels.json").write_text("{not json")
    model, _ = load_model(str(tiny_dir), onednn="auto")
    assert fresh_choice["calls"] == 2 and not cpu.decodes_onednn(model)


def test_true_and_false_force_the_kernels(tiny_dir, fresh_choice):
    from posttrain.models import load_model

    fresh_choice["speedups"] = (0.5, 0.5)
    on, _ = load_model(str(tiny_dir), onednn=True)
    off, _ = load_model(str(tiny_dir), onednn=False)
    assert fresh_choice["calls"] == 0  # nothing measured
    assert cpu.decodes_onednn(on) and any(cpu.switched(m) for m in on.modules())
    assert not cpu.decodes_onednn(off) and not any(cpu.switched(m) for m in off.modules())
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        cpu.use_kernels(off, "fast")


def test_measured_speed_ups_are_positive_ratios(tiny_dir):
    """The real measurement on the tiny model's shapes: two finite positive ratios."""
    from posttrain.models import load_model

    model, _ = load_model(str(tiny_dir))
    train, decode = cpu._timings(cpu._shapes(model))
    assert 0 < train < 100 and 0 < decode < 100


def test_a_resumed_run_keeps_the_kernels_it_chose(tiny_dir, tmp_path, fresh_choice, capsys):
    """The choice goes into each checkpoint; resuming pins it, whatever a new measurement says,
    so that the resumed run continues with the same kernels (exact resume)."""
    import json

    from posttrain.algos import sft
    from posttrain.config import load_config

    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i} + 1 = ", "completion": str(i + 1)}) for i in range(8)))  # fmt: skip
    args = [f"--model.name={tiny_dir}", f"--data.source={data}", "--data.validation_size=0",
            "--train.batch_size=2", "--train.max_steps=2", "--run.save_every=1",
            f"--run.out_dir={tmp_path / 'runs'}", "--run.progress=false", "--eval_limit=0"]  # fmt: skip
    fresh_choice["speedups"] = (1.5, 0.5)
    assert sft.main(load_config(sft.Config, None, args)) == 0
    (run,) = (tmp_path / "runs").iterdir()
    last = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert list(json.loads((last / "state.json").read_text())["kernels"].values()) == [[1.5, 0.5]]
    cpu._CHOICES.clear()  # a new process, on a machine that now measures the other way
    cpu._PRINTED.clear()
    (tmp_path / "kernels.json").unlink()
    fresh_choice["speedups"] = (0.5, 2.0)
    capsys.readouterr()
    cfg = load_config(sft.Config, None, [*args, "--train.max_steps=3", f"--run.resume={run}"])
    seen = {}
    import posttrain.train

    load_policy = posttrain.train.load_policy

    def spy(*a, **k):
        seen["policy"], tok = load_policy(*a, **k)
        return seen["policy"], tok

    posttrain.train.load_policy = spy
    try:
        assert sft.main(cfg) == 0
    finally:
        posttrain.train.load_policy = load_policy
    assert fresh_choice["calls"] == 1  # the resumed run measured nothing
    assert any(cpu.switched(m) for m in seen["policy"].modules())
    assert not cpu.decodes_onednn(seen["policy"])
    assert "the resumed run's checkpoint" in capsys.readouterr().out
