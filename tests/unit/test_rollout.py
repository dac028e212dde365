"""Batched generation: left padding, log-probs, stops, micro-batching."""

from __future__ import annotations

import torch

from posttrain.forwards import completion_logps
from posttrain.rollout import GenerationConfig, _micro_batches, generate, generate_sequential

PROMPTS = [
    "How many grams",
    "The movie was",
    "Convert 3 feet to inches. It is a very long prompt with many words in it",
    "hello",
]


def test_batched_greedy_equals_sequential(tiny):
    model, tok = tiny
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=12)
    batched = generate(model, tok, PROMPTS, cfg)
    seq = generate_sequential(model, tok, PROMPTS, cfg)
    assert batched.completions == seq.completions
    for i in range(len(PROMPTS)):
        n = int(seq.completion_mask[i].sum())
        assert int(batched.completion_mask[i].sum()) == n
        assert torch.equal(batched.completion_ids[i, :n], seq.completion_ids[i, :n])
        torch.testing.assert_close(batched.logp[i, :n], seq.logp[i, :n], atol=1e-5, rtol=1e-4)
    # rows keep input order and the left-padded prompt is the prompt's own tokens
    for i, p in enumerate(PROMPTS):
        ids = batched.prompt_ids[i][batched.prompt_mask[i].bool()].tolist()
        assert ids == tok(p)["input_ids"]


def test_rollout_logp_equals_teacher_forced(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    cfg = GenerationConfig(temperature=0.7, max_new_tokens=10, n=3)
    roll = generate(model, tok, PROMPTS[:3], cfg)
    T = roll.completion_ids.shape[1]
    with torch.no_grad():
        logp = completion_logps(model, roll.input_ids, roll.attention_mask, T, temperature=0.7)
    m = roll.completion_mask
    torch.testing.assert_close(logp * m, roll.logp * m, atol=1e-4, rtol=1e-4)
    assert roll.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len(roll.completions) == 9


def test_micro_batches_give_same_result(tiny):
    model, tok = tiny
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=8)
    small = GenerationConfig(temperature=0.0, max_new_tokens=8, token_budget=40)
    rows = GenerationConfig(temperature=0.0, max_new_tokens=8, max_batch_size=3)
    a = generate(model, tok, PROMPTS, cfg)
    b = generate(model, tok, PROMPTS, small)
    c = generate(model, tok, PROMPTS, rows)
    assert a.completions == b.completions == c.completions
    assert _micro_batches([5] * 7, rows) == [[0, 1, 2], [3, 4, 5], [6]]


def test_eos_stops_and_masks(tiny):
    model, tok = tiny

    # Make EOS the most likely token everywhere: every completion is exactly one EOS token.
    def boost_eos(module, inputs, out):
        out[..., tok.eos_token_id] += 100.0
        return out

    handle = model.lm_head.register_forward_hook(boost_eos)
    roll = generate(model, tok, PROMPTS, GenerationConfig(temperature=0.0, max_new_tokens=5))
    handle.remove()
    assert roll.completion_mask.sum(1).tolist() == [1.0] * len(PROMPTS)
    assert roll.finish_reasons == ["eos"] * len(PROMPTS)
    assert roll.completions == [""] * len(PROMPTS)


def test_stop_strings_cut_text(tiny):
    model, tok = tiny
    cfg = GenerationConfig(temperature=0.0, max_new_tokens=20)
    free = generate(model, tok, PROMPTS[:2], cfg)
    # pick a stop string from the middle of the first free completion
    text = free.completions[0]
    assert len(text) > 4
    stop = text[2:4]
    cut = generate(
        model, tok, PROMPTS[:2], GenerationConfig(temperature=0.0, max_new_tokens=20, stop=[stop])
    )
    assert cut.completions[0] == text[: text.find(stop) + len(stop)]
    assert cut.finish_reasons[0] == "stop"
    assert cut.completion_mask[0].sum() < free.completion_mask[0].sum()


def test_chat_template_and_top_k(tiny):
    model, tok = tiny
    roll = generate(
        model,
        tok,
        ["hi", [{"role": "user", "content": "hello"}]],
        GenerationConfig(
            chat=True, system_prompt="Be brief.", top_k=5, top_p=0.9, max_new_tokens=4
        ),
    )
    assert roll.prompts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert roll.prompts[1].endswith("<|im_start|>assistant\n")
    assert torch.isfinite(roll.logp).all()


def test_top_k_one_is_greedy(tiny):
    model, tok = tiny
    g = generate(model, tok, PROMPTS, GenerationConfig(temperature=0.0, max_new_tokens=6))
    k1 = generate(model, tok, PROMPTS, GenerationConfig(temperature=1.3, top_k=1, max_new_tokens=6))
    assert g.completions == k1.completions
