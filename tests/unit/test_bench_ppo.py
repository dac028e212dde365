"""bench/trl_compare.py's ppo rows (posttrain PPO against TRL 1.12's PPOTrainer): the refusal
when TRL 1.12's venv is missing, the settings both sides get, the pad token that TRL's id-based
padding masks need, and the row's limit arithmetic. No timing, no network, no TRL 1.12 venv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import trl_compare  # noqa: E402
from limits import (  # noqa: E402
    ModelCounts,
    Peaks,
    forward_flops,
    rollout_seconds,
    train_flops,
    train_limit_seconds,
)

PPO = trl_compare.WORKLOADS["ppo"]


def test_ppo_rows_run_trl_112_and_no_row_compares_ppo_with_rloo():
    for name in ("ppo", "ppo_plain"):
        w = trl_compare.WORKLOADS[name]
        assert (w.trl, w.trl_env) == ("PPOTrainer", "trl112"), name
        assert "1.12.0" in w.notes or name.endswith("_plain")
    assert trl_compare.WORKLOADS["ppo_plain"].plain
    assert "ppo_2x4" not in trl_compare.WORKLOADS
    assert not [
        w for w in trl_compare.WORKLOADS.values() if w.kind == "ppo" and w.trl != "PPOTrainer"
    ]
    assert {"ppo", "ppo_plain"} <= set(trl_compare.DEFAULT_WORKLOADS)
    assert not [n for n in trl_compare.DEFAULT_WORKLOADS if n.startswith("reinforce")]


def test_missing_venv_is_refused_with_the_make_target(tmp_path):
    msg = trl_compare.missing_trl_envs(["grpo", "ppo"], ["posttrain", "trl"], tmp_path)
    assert msg is not None and "make bench-trl112-venv" in msg and "ppo" in msg
    assert "grpo" not in msg  # grpo's TRL side runs next to posttrain
    assert str(tmp_path / ".venv-trl112") in msg
    assert trl_compare.trl_python(PPO, tmp_path) is None
    # posttrain's side alone needs no TRL 1.12, nor do rows without a trl_env
    assert trl_compare.missing_trl_envs(["ppo"], ["posttrain"], tmp_path) is None
    assert (
        trl_compare.missing_trl_envs(["grpo", "sft_full"], ["posttrain", "trl"], tmp_path) is None
    )
    assert trl_compare.trl_python(trl_compare.WORKLOADS["grpo"], tmp_path) == Path(sys.executable)


def test_a_built_venv_is_used(tmp_path):
    py = tmp_path / ".venv-trl112" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.touch()
    assert trl_compare.trl_python(PPO, tmp_path) == py
    assert trl_compare.missing_trl_envs(["ppo", "ppo_plain"], ["trl"], tmp_path) is None


def test_parent_refuses_before_running_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trl_compare, "HERE", tmp_path)  # a bench/ without TRL 1.12's venv
    monkeypatch.setattr(trl_compare, "run_child", lambda *a, **k: pytest.fail("a child ran"))
    assert trl_compare.main(["--workloads", "grpo,ppo", "--no-limits"]) == 2
    assert "make bench-trl112-venv" in capsys.readouterr().err


def _posttrain_args(tmp_path: Path) -> list[str]:
    args = argparse.Namespace(model=str(tmp_path), warmup=1, steps=2, threads=2, dtype="float32",
                              reward_model=str(tmp_path / "rm"))  # fmt: skip
    return trl_compare.posttrain_argv(PPO, args, None, tmp_path)


def test_posttrain_side_gets_trl_ppo_settings(tmp_path):
    """The posttrain side of the row has TRL 1.12 PPOConfig's settings (run_trl_ppo): 8 prompts x
    1, 1 epoch x 1 minibatch, fixed k1 KL at TRL's beta, a separate value model, the shared
    reward model, no gradient clipping (TRL's PPO never clips)."""
    argv = _posttrain_args(tmp_path)
    assert argv[0] == "ppo"
    want = {
        "--batch_size=8", "--samples_per_prompt=1", "--num_minibatches=1", "--update_epochs=1",
        f"--kl_coef={PPO.trl_kl}", "--kl_controller=fixed", "--kl_estimator=k1", "--ref=copy",
        "--critic=separate", "--whiten_advantages=true", "--whiten_rewards=false",
        "--vf_coef=0.1", "--ent_coef=0", "--clip_range=0.2", "--clip_range_value=0.2",
        "--gamma=1.0", "--lam=0.95", "--gen.max_new_tokens=32", "--gen.temperature=1.0",
        "--optim.max_grad_norm=0", f"--optim.lr={PPO.lr}", "--model.dtype=float32",
        f"--reward.components=model:{tmp_path / 'rm'}",
    }  # fmt: skip
    assert want <= set(argv), want - set(argv)
    assert PPO.kl == PPO.trl_kl and PPO.group == 1 and PPO.batch == 8


def test_posttrain_ppo_accepts_the_settings(tmp_path):
    """Every flag the harness passes is a real `posttrain ppo` option (an unknown key is an error)."""
    from posttrain.algos.ppo import Config
    from posttrain.config import load_config

    cfg = load_config(Config, overrides=_posttrain_args(tmp_path)[1:])
    assert cfg.critic == "separate" and cfg.kl_controller == "fixed"
    assert cfg.optim.max_grad_norm == 0 and cfg.reward.components == [f"model:{tmp_path / 'rm'}"]


def test_pad_token_is_neither_eos_nor_in_the_prompts():
    from conftest import build_tokenizer

    tok = build_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert trl_compare.ppo_pad_token(tok, [chat]) == "<|endoftext|>"
    tok.pad_token = tok.eos_token  # as SmolLM2 ships: pad = eos = <|im_end|>
    assert trl_compare.ppo_pad_token(tok, [chat]) == "<|endoftext|>"
    with pytest.raises(ValueError, match="no token id left"):
        trl_compare.ppo_pad_token(tok, [chat + "<|endoftext|>" + "".join(tok.all_special_tokens)])


def test_ppo_row_limit_by_hand():
    """ppo: the real tokens count the policy's and the value model's training forwards (2 per
    sequence token); the sampled sequences are half of them; the reference and the reward model
    each add one forward over the sequences. The value and reward models have a scalar head: no
    LM head (here 160 of the 1000 matmul weights) in their FLOPs."""
    peaks = Peaks(fp32_gflops=100.0, bf16_gflops=200.0, read_gbs=10.0, cpu="test", threads=1)
    counts = ModelCounts(matmul_params=1000, total_params=1100, norm_params=100, layers=2,
                         hidden=16, attn_width=16, kv_width=8, head_params=160)  # fmt: skip
    trunk = ModelCounts(matmul_params=840, total_params=1100, norm_params=100, layers=2,
                        hidden=16, attn_width=16, kv_width=8)  # fmt: skip
    assert counts.headless() == trunk
    side = {"real_step": 1600.0, "padded_step": 1760.0, "tok_step": 200.0}
    ctx = trl_compare.causal_context(1760 // 16)  # 16 rows: 8 sequences x 2 models
    want = train_limit_seconds(peaks, train_flops(counts, 800, ctx), "float32")
    want += train_limit_seconds(peaks, train_flops(trunk, 800, ctx), "float32")
    want += rollout_seconds(peaks, counts, prompt_tokens=600, prompt_attn_context=ctx,
                            new_tokens=200.0, batch=8, context_len=100.0, dtype="float32")[0]  # fmt: skip
    want += train_limit_seconds(peaks, forward_flops(counts, 800, ctx), "float32")
    want += train_limit_seconds(peaks, forward_flops(trunk, 800, ctx), "float32")
    got = trl_compare.row_limit(PPO, [side, side], peaks, counts, "float32")
    assert got == pytest.approx(want)
