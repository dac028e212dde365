"""Shared online-RL pieces: generation settings, prompt stream, reference policy, scoring pass."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError, LoraConfig, load_config
from posttrain.forwards import completion_logps
from posttrain.models import apply_lora
from posttrain.online import (
    GenOverrides,
    PromptStream,
    build_reference,
    micro_batches,
    resolve_generation,
    score_rollout,
)
from posttrain.ops import selective_log_softmax
from posttrain.rollout import GenerationConfig, generate


def test_task_defaults_with_config_keys_winning():
    task_gen = GenerationConfig(max_new_tokens=48, temperature=0.7, stop=["</answer>"], chat=True)
    gen = resolve_generation(task_gen, GenOverrides(), n=4)
    assert (gen.max_new_tokens, gen.temperature, gen.stop, gen.chat, gen.n) == (
        48,
        0.7,
        ["</answer>"],
        True,
        4,
    )
    # a key set in [gen] wins, even when it equals GenerationConfig's own default
    over = GenOverrides(temperature=1.0, stop=[], max_new_tokens=8)
    gen = resolve_generation(task_gen, over, n=1)
    assert (gen.max_new_tokens, gen.temperature, gen.stop, gen.chat) == (8, 1.0, [], True)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        resolve_generation(task_gen, GenOverrides(temperature=0.0), n=1)


def test_gen_overrides_load_from_flags():
    from posttrain.algos.reinforce import Config

    cfg = load_config(Config, None, ["--gen.temperature=0.9", "--gen.stop", "</a>"])
    assert (
        cfg.gen.temperature == 0.9 and cfg.gen.stop == ["</a>"] and cfg.gen.max_new_tokens is None
    )


def test_prompt_stream_is_seeded_cycles_and_resumes():
    rows = [{"prompt": str(i)} for i in range(5)]
    a = PromptStream(rows, seed=3)
    first = [r["prompt"] for r in a.next(5)]
    assert sorted(first) == [str(i) for i in range(5)]  # one epoch = every row once
    second = [r["prompt"] for r in a.next(5)]
    assert sorted(second) == sorted(first) and second != first  # reshuffled
    b = PromptStream(rows, seed=3)
    b.next(3)
    c = PromptStream(rows, seed=3)
    c.load_state_dict(b.state_dict())
    assert [r["prompt"] for r in c.next(4)] == [r["prompt"] for r in b.next(4)]
    # two processes split the global order between them
    p0, p1 = PromptStream(rows, 3, 0, 2), PromptStream(rows, 3, 1, 2)
    interleaved = [x for pair in zip(p0.next(5), p1.next(5)) for x in pair]
    assert [r["prompt"] for r in interleaved] == first + second
    with pytest.raises(ConfigError):
        PromptStream([], seed=0)


def test_micro_batches_cover_rows_once():
    chunks = micro_batches(10, 3, torch.arange(10).flip(0))
    assert [len(c) for c in chunks] == [4, 3, 3]
    assert sorted(torch.cat(chunks).tolist()) == list(range(10))
    assert len(micro_batches(2, 8)) == 2


def test_reference_adapter_is_the_base_model(tiny):
    """ref=adapter gives exactly the base model's log-probs after the adapter has been trained."""
    model, tok = tiny
    ids = tok(["The movie was great", "hello world"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = completion_logps(model, ids["input_ids"], ids["attention_mask"], 3)
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # a trained adapter: move its B matrices off zero
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)
    ref = build_reference("auto", peft_model, kl_coef=0.1)
    assert ref is not None and ref.kind == "adapter"
    logits = ref.logits(ids["input_ids"], ids["attention_mask"], 3, 1.0)
    ref_logp = selective_log_softmax(logits, ids["input_ids"][:, -3:])
    torch.testing.assert_close(ref_logp, base, atol=0, rtol=0)
    with torch.no_grad():
        policy = completion_logps(peft_model, ids["input_ids"], ids["attention_mask"], 3)
    assert not torch.allclose(policy, base)


def test_build_reference_choices(tiny):
    model, _ = tiny
    assert build_reference("auto", model, kl_coef=0.0) is None
    ref = build_reference("auto", model, kl_coef=0.1)
    assert ref.kind == "copy" and ref.model is not model
    assert not any(p.requires_grad for p in ref.model.parameters())
    with pytest.raises(ConfigError, match="LoRA"):
        build_reference("adapter", model, kl_coef=0.1)
    with pytest.raises(ConfigError, match="needs a reference"):
        build_reference("none", model, kl_coef=0.1)


def test_score_rollout_matches_sampler(tiny):
    """The no-grad pass gives the sampler's log-probs; KL to an identical copy is 0."""
    model, tok = tiny
    torch.manual_seed(0)
    gen = GenerationConfig(max_new_tokens=6, temperature=0.8, n=2)
    roll = generate(model, tok, ["hello", "The movie was", "Convert 3 feet"], gen)
    ref = build_reference("copy", model, kl_coef=1.0)
    s = score_rollout(model, ref, roll, temperature=0.8, n_micro=2)
    m = roll.completion_mask
    torch.testing.assert_close(s.old_logp, roll.logp * m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s.ref_logp, s.old_logp)
    assert s.kl_exact.abs().max() < 1e-6
    assert (s.entropy[m == 0] == 0).all() and (s.entropy[m == 1] > 0).all()


def test_auto_reference_of_a_run_from_an_sft_adapter_is_that_policy(tiny_dir, tmp_path):
    """`--model.adapter DIR` with LoRA continues training a saved (SFT) adapter: ref=auto must be
    the policy the run starts from (base + that adapter), not the base with the adapter off (the
    model before SFT), so the KL to it is 0 at step 0."""
    from posttrain.config import ModelConfig
    from posttrain.models import load_model
    from posttrain.train import load_policy

    base, tok = load_model(str(tiny_dir))
    sft = apply_lora(base, LoraConfig(enabled=True, r=4, dropout=0.0))
    with torch.no_grad():  # a trained adapter: lora_B is no longer zero
        for name, p in sft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sft.save_pretrained(tmp_path / "sft")
    policy, _ = load_policy(
        ModelConfig(name=str(tiny_dir), adapter=str(tmp_path / "sft")), LoraConfig(enabled=True)
    )
    policy.eval()
    ids = tok(["hello world", "The movie was"], return_tensors="pt", padding=True)
    with torch.no_grad():
        start = completion_logps(policy, ids["input_ids"], ids["attention_mask"], 3)
        ref = build_reference("auto", policy, kl_coef=0.1, adapter=str(tmp_path / "sft"))
        logits = ref.logits(ids["input_ids"], ids["attention_mask"], 3, 1.0)
    ref_logp = selective_log_softmax(logits, ids["input_ids"][:, -3:])
    torch.testing.assert_close(ref_logp, start)
    # the reference stays put while the policy's adapter trains
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
        again = ref.logits(ids["input_ids"], ids["attention_mask"], 3, 1.0)
    torch.testing.assert_close(again, logits)
