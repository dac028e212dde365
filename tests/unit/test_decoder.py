"""The lean decode step (`posttrain.decoder`) against the model's own forward, and bf16 rollouts
with their importance correction (`online.score_rollout`, `online.sampler_weighted`)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_model

from posttrain import cpu
from posttrain.decoder import LeanDecoder
from posttrain.forwards import prompt_pass
from posttrain.ops import position_ids_from_mask
from posttrain.rollout import GenerationConfig, generate

PROMPTS = ["How many grams", "The movie was", "Convert 3 feet to inches. It is long", "hi"]


def _llama(vocab: int, bias: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=bias, mlp_bias=bias)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    if bias:  # random biases: zeros would hide a bias applied in the wrong place
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    return model


def _steps_against_forward(model: torch.nn.Module, dec: LeanDecoder, steps: int = 5) -> float:
    """Largest |lean logits - forward logits| over `steps` greedy steps of a left-padded batch."""
    torch.manual_seed(1)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    worst = 0.0
    with torch.no_grad():
        out, cache_mask = prompt_pass(model, ids, mask)
        dec.load(out.cache, cache_mask, steps)
        nxt = out.logits[:, -1].argmax(-1)
        pos = position_ids_from_mask(cache_mask)[:, -1:]
        for _ in range(steps):
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            lean = dec.step(nxt, pos)
            ref = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, -1]  # fmt: skip
            worst = max(worst, float((lean - ref).abs().max()))
            nxt = ref.argmax(-1)
    return worst


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("onednn", [False, True])
def test_lean_step_equals_the_model_forward(bias, onednn):
    """Grouped-query attention, left padding, biases, both kernels: the model's logits to float
    noise at every step."""
    if onednn and not cpu.available():
        pytest.skip("this torch has no oneDNN linear kernels")
    model = _llama(96, bias)
    if onednn:
        cpu.use_onednn(model)
    dec = LeanDecoder.build(model)
    assert dec is not None and dec.onednn == onednn
    assert _steps_against_forward(model, dec) < 1e-5


def test_lean_weights_are_a_copy_taken_at_build():
    """Training changes the model's weights in place after a rollout: the decoder built before
    keeps its own copy, a decoder built after sees the change."""
    model = _llama(96)
    dec = LeanDecoder.build(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert _steps_against_forward(model, dec) > 1e-3
    assert _steps_against_forward(model, LeanDecoder.build(model)) < 1e-5


def test_lean_decoder_on_lora_weights():
    """A LoRA policy decodes on W + scale B A; with the adapter disabled, on the base weights."""
    from peft import LoraConfig, get_peft_model

    base = _llama(96)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # peft starts B at 0, which would hide the adapter
    model.eval()
    dec = LeanDecoder.build(model)
    assert dec is not None
    assert _steps_against_forward(model, dec) < 1e-5
    with model.disable_adapter():
        plain = LeanDecoder.build(model)
        assert _steps_against_forward(model, plain) < 1e-5
    # the adapter changes the logits: the two decoders differ
    assert not torch.equal(dec.layers[0].qkv, plain.layers[0].qkv)


def test_other_architectures_use_their_forward(tiny):
    """GPT-2 (no lean step) returns None and samples through its forward; bf16 sampling, which
    needs the lean step, refuses with the fix."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4)).eval()
    assert LeanDecoder.build(gpt2) is None
    roll = generate(gpt2, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=4, temperature=0))
    assert roll.exact_logp and len(roll) == 2
    with pytest.raises(ValueError, match="gen.sample_dtype=model"):
        generate(
            gpt2, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=4, sample_dtype="bfloat16")
        )


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_lean_equals_the_model_forward(tiny, temperature):
    """The same tokens (greedy and seeded sampling) and log-probs with the lean decoder and
    without it, across micro-batches and stop strings."""
    model, tok = tiny
    kw = dict(max_new_tokens=10, temperature=temperature, n=2, stop=["\n"], max_batch_size=3)
    seeds = [5, 6, 7, 8]
    lean = generate(model, tok, PROMPTS, GenerationConfig(**kw), seeds=seeds)
    plain = generate(model, tok, PROMPTS, GenerationConfig(**kw, lean_decoder=False), seeds=seeds)
    assert torch.equal(lean.completion_ids, plain.completion_ids)
    assert lean.completions == plain.completions
    assert lean.finish_reasons == plain.finish_reasons
    torch.testing.assert_close(lean.logp, plain.logp, atol=1e-5, rtol=1e-4)


def test_bf16_rollouts_are_rescored_and_weighted(tiny):
    """A bf16 copy samples (logp near the fp32 policy's, not equal: exact_logp False); the
    scoring pass then takes the policy's own log-probs even on policy, and each token's weight is
    min(exp(old_logp - sampler logp), cap), by hand."""
    from posttrain.forwards import completion_logps
    from posttrain.online import sampler_weighted, score_rollout

    model, tok = tiny
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, n=2, sample_dtype="bfloat16",
                           sampler_weight_cap=1.01)  # fmt: skip
    roll = generate(model, tok, PROMPTS[:2], cfg, seeds=[1, 2])
    assert not roll.exact_logp
    m = roll.policy_mask
    with torch.no_grad():
        fp32 = completion_logps(model, roll.input_ids, roll.attention_mask, m.shape[1]) * m
    gap = ((roll.logp - fp32).abs() * m).max()
    assert 0 < gap < 0.1  # bf16 rounding, not another distribution
    s = score_rollout(model, None, roll, temperature=1.0, n_micro=1, on_policy=True,
                      sampler_weight_cap=1.01)  # fmt: skip
    torch.testing.assert_close(s.old_logp, fp32, atol=1e-5, rtol=1e-5)
    expected = torch.exp(fp32 - roll.logp).clamp(max=1.01) * m
    torch.testing.assert_close(s.sampler_weight, expected)
    assert (s.sampler_weight[m.bool()] < 1.01).any() and (s.sampler_weight <= 1.01).all()
    adv = torch.tensor([1.0, -2.0, 0.5, 0.0])
    torch.testing.assert_close(sampler_weighted(adv, s), adv[:, None] * expected)
    exact = generate(model, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=8), seeds=[1, 2])
    s2 = score_rollout(model, None, exact, temperature=1.0, n_micro=1, on_policy=True)
    assert s2.sampler_weight is None and sampler_weighted(adv, s2) is adv


def test_bf16_decoder_logits_near_fp32():
    """The bf16 copy's logits stay within bf16 rounding of the fp32 forward's."""
    if not cpu.available():
        pytest.skip("this torch has no oneDNN linear kernels")
    model = _llama(96)
    dec = LeanDecoder.build(model, torch.bfloat16)
    assert dec is not None and dec.dtype == torch.bfloat16
    worst = _steps_against_forward(model, dec)
    assert 1e-5 < worst < 0.1


def test_reinforce_loss_per_token_advantages():
    """A (B, T) advantage constant along T gives the (B,) loss; weights scale each token's term."""
    from posttrain.algos.reinforce import reinforce_loss

    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    per_seq, _ = reinforce_loss(logp, mask, adv)
    per_tok, _ = reinforce_loss(logp, mask, adv[:, None].expand(2, 3))
    torch.testing.assert_close(per_seq, per_tok)
    w = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, 1.0]])
    weighted, _ = reinforce_loss(logp, mask, adv[:, None] * w)
    # -(2 * (-1 - 1 - 6)) = 16 and -(-1 * -2) = -2, mean 7
    torch.testing.assert_close(weighted, torch.tensor(7.0))


def test_lean_decoder_on_the_fixture_model(tiny):
    """The conftest model (the one every rollout test samples) takes the lean path."""
    model, tok = tiny
    assert LeanDecoder.build(model) is not None
    assert LeanDecoder.build(build_model(tok).to(torch.float64)) is None  # float64: its forward


def test_autocast_samples_through_the_model_forward(tiny):
    """Under CPU autocast (run.autocast=bfloat16) the model's forward samples, autocast like the
    training forward that rescores it."""
    model, tok = tiny
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LeanDecoder.build(model) is None
        roll = generate(model, tok, PROMPTS[:2], GenerationConfig(max_new_tokens=4))
    assert roll.exact_logp and len(roll) == 2


def test_training_commands_take_the_sampler_keys(tiny_dir, tmp_path):
    """grpo's [gen] section takes sample_dtype and sampler_weight_cap (resolved onto the task's
    generation settings), lean_decoder and continuous_batching; a bad value names the key."""
    from posttrain.algos.grpo import Config
    from posttrain.config import ConfigError, load_config
    from posttrain.online import GenOverrides, resolve_generation

    cfg = load_config(Config, None, [f"--model={tiny_dir}", "--gen.sample_dtype=bfloat16",
                                     "--gen.sampler_weight_cap=3", "--gen.lean_decoder=false",
                                     "--gen.continuous_batching=false"])  # fmt: skip
    gen = resolve_generation(GenerationConfig(), cfg.gen, n=2)
    assert (gen.sample_dtype, gen.sampler_weight_cap, gen.lean_decoder) == ("bfloat16", 3.0, False)
    assert not gen.continuous_batching
    assert resolve_generation(GenerationConfig(), GenOverrides(), n=1).sample_dtype == "model"
    with pytest.raises(ConfigError, match="gen.sample_dtype"):
        load_config(Config, None, [f"--model={tiny_dir}", "--gen.sample_dtype=float16"])


def test_sharded_or_odd_weights_use_the_model_forward():
    """A weight that is not the layer's whole (out, in) tensor (a flat FSDP shard) or not a plain
    tensor: no lean decoder."""
    model = _llama(96)
    layer = model.model.layers[1].mlp.down_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().flatten()[:100])
    assert LeanDecoder.build(model) is None


STREAM_PROMPTS = [
    "hi", "The movie", "How many grams are in a pound", "Paris",
    "Convert 3 feet to inches. It is a long prompt with many words in it, longer than the rest",
    "a", "The quick brown fox jumps over", "ok", "What is", "Tell me a story about a cat", "x",
    "Seven",
]  # fmt: skip


def _count_calls(monkeypatch, name: str) -> list[int]:
    calls = [0]
    orig = getattr(LeanDecoder, name)

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(LeanDecoder, name, counted)
    return calls


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_equals_micro_batches(tiny, monkeypatch, temperature):
    """More rows than slots: the lean decoder refills a finished row's slot with the next row
    (`rollout._stream_decode`). Short prompts first and long ones later (a prompt longer than the
    filled columns), more steps than the cache has columns (old columns dropped): the same
    tokens, log-probs and finish reasons as micro-batches through the model's forward."""
    model, tok = tiny
    compactions = _count_calls(monkeypatch, "compact")
    kw = dict(max_new_tokens=12, temperature=temperature)
    seeds = list(range(len(STREAM_PROMPTS)))
    stream = generate(model, tok, STREAM_PROMPTS, GenerationConfig(**kw), seeds=seeds, batch_size=2)
    plain = generate(model, tok, STREAM_PROMPTS, GenerationConfig(**kw, lean_decoder=False),
                     seeds=seeds, batch_size=2)  # fmt: skip
    assert compactions[0] >= 1
    assert torch.equal(stream.completion_ids, plain.completion_ids)
    assert torch.equal(stream.completion_mask, plain.completion_mask)
    assert stream.finish_reasons == plain.finish_reasons
    assert stream.completions == plain.completions
    torch.testing.assert_close(stream.logp, plain.logp, atol=1e-5, rtol=1e-4)


def test_continuous_batching_keeps_every_step_full(tiny, monkeypatch):
    """Rows that end early (a stop string) hand their slot on: fewer decode steps than
    micro-batches that each run until their longest row ends, and the same rows."""
    model, tok = tiny
    steps = _count_calls(monkeypatch, "step")
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, stop=["e"], n=2)
    seeds = list(range(len(STREAM_PROMPTS)))
    stream = generate(model, tok, STREAM_PROMPTS, cfg, seeds=seeds, batch_size=3)
    plain = generate(model, tok, STREAM_PROMPTS, dataclasses.replace(cfg, lean_decoder=False),
                     seeds=seeds, batch_size=3)  # fmt: skip
    assert stream.completions == plain.completions and stream.finish_reasons == plain.finish_reasons
    lengths = plain.completion_mask.sum(1).long().tolist()
    assert len(set(lengths)) > 2 and "stop" in plain.finish_reasons  # rows end at many lengths
    # micro-batches of 3 rows: each decodes (its longest row - 1) steps after the prefill
    micro = sum(max(lengths[i : i + 3]) - 1 for i in range(0, len(lengths), 3))
    assert steps[0] < micro
    assert steps[0] >= (sum(lengths) - len(lengths)) / 3  # at most 3 rows a step


def test_place_and_compact_keep_the_logits():
    """Columns no row needs are dropped (`compact`) and a new row is placed into a finished row's
    slot (`place`) mid-rollout: the new row and the row that carries on both get the logits the
    model's forward gives their own sequences."""
    model = _llama(64)
    dec = LeanDecoder.build(model)
    torch.manual_seed(2)
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1's prompt starts at column 2
    seq1 = ids[1:, 2:]
    with torch.no_grad():
        out, cache_mask = prompt_pass(model, ids, mask)
        dec.load(out.cache, cache_mask, 8)
        for buf in (*dec.keys, *dec.values):
            buf[:, :, 6:] = float("nan")
        pos = position_ids_from_mask(cache_mask)[:, -1:]
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(3):  # 6 + 3 columns filled
            seq1 = torch.cat([seq1, tok[1:, None]], 1)
            pos = pos + 1
            tok = dec.step(tok, pos).argmax(-1)
        dec.compact(2)  # row 0 ends; nobody needs columns 0 and 1
        assert dec.length == 7
        for buf in (*dec.keys, *dec.values):  # past the filled columns: garbage, here NaN
            buf[:, :, 7:] = float("nan")
        new = torch.randint(0, 64, (1, 9))  # longer than the 7 filled columns
        pre, pre_mask = prompt_pass(model, new, torch.ones_like(new))
        dec.place(0, pre.cache, 0, pre_mask[0])  # the new row in slot 0, columns 0..8
        assert dec.length == 9  # columns 7 and 8 skipped (masked) for row 1
        tok = torch.stack([pre.logits[0, -1].argmax(), tok[1]])
        pos[0, 0] = 8
        for _ in range(3):
            new = torch.cat([new, tok[:1, None]], 1)
            seq1 = torch.cat([seq1, tok[1:, None]], 1)
            pos = pos + 1
            logits = dec.step(tok, pos)
            torch.testing.assert_close(logits[0], model(input_ids=new).logits[0, -1], atol=1e-5, rtol=1e-5)  # fmt: skip
            torch.testing.assert_close(logits[1], model(input_ids=seq1).logits[0, -1], atol=1e-5, rtol=1e-5)  # fmt: skip
            tok = logits.argmax(-1)
