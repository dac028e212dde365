"""`forwards.completion_logits_shared` (each distinct prompt through the model once, its KV cache
indexed back to the rows) against the plain per-row pass `forwards.completion_logits`."""

from __future__ import annotations

import pytest
import torch

from posttrain.forwards import completion_logits, completion_logits_shared
from posttrain.ops import selective_log_softmax


def _batch(tok):
    """Two prompts of different lengths (left-padded) x 3 samples each, completions right-padded
    to 4 tokens with lengths 4, 2, 3 / 1, 4, 4 -> input_ids, attention_mask, groups, T."""
    prompts = [tok("Convert 3 feet to inches.")["input_ids"], tok("hello world")["input_ids"]]
    P = max(len(p) for p in prompts)
    g = torch.Generator().manual_seed(0)
    ids, mask, groups = [], [], []
    lengths = [[4, 2, 3], [1, 4, 4]]
    for i, p in enumerate(prompts):
        for n in lengths[i]:
            comp = torch.randint(3, tok.vocab_size, (4,), generator=g).tolist()
            ids.append(
                [tok.pad_token_id] * (P - len(p)) + p + comp[:n] + [tok.pad_token_id] * (4 - n)
            )
            mask.append([0] * (P - len(p)) + [1] * (len(p) + n) + [0] * (4 - n))
            groups.append(i)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(groups), 4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_logps_and_grads_match_plain_pass(tiny, temperature):
    """Same log-probs on completion tokens and the same gradient of their masked sum, whether the
    prompts are run once per row or once per group (float reassociation only: atol 1e-5)."""
    model, tok = tiny
    ids, mask, groups, T = _batch(tok)
    cmask = mask[:, -T:].float()
    out = {}
    for name, fn in [
        ("plain", lambda: completion_logits(model, ids, mask, T, temperature)),
        (
            "shared",
            lambda: completion_logits_shared(model, ids, mask, T, temperature, groups=groups),
        ),
    ]:
        model.zero_grad()
        logits = fn()
        assert logits.shape == (6, T, model.config.vocab_size)
        logp = selective_log_softmax(logits, ids[:, -T:])
        (logp * cmask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[name] = (logp.detach() * cmask, grads)
    torch.testing.assert_close(out["shared"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["shared"][1], out["plain"][1], atol=1e-5, rtol=1e-4)


def test_shared_prompt_falls_back_when_every_prompt_is_distinct(tiny):
    """All groups distinct -> exactly the plain pass (same function, bit for bit)."""
    model, tok = tiny
    ids, mask, _, T = _batch(tok)
    with torch.no_grad():
        a = completion_logits(model, ids, mask, T)
        b = completion_logits_shared(model, ids, mask, T, groups=torch.arange(6))
    assert torch.equal(a, b)


def test_shared_prompt_one_completion_token(tiny):
    """T = 1: the prompt's last position alone predicts the completion token."""
    model, tok = tiny
    ids, mask, groups, T = _batch(tok)
    ids, mask = ids[:, : ids.shape[1] - 3], mask[:, : mask.shape[1] - 3]
    with torch.no_grad():
        a = completion_logits(model, ids, mask, 1)
        b = completion_logits_shared(model, ids, mask, 1, groups=groups)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_prefills_each_prompt_once_with_the_same_result(tiny, temperature, lean):
    """`rollout._decode_loop` with groups (prompt pre-filled once, KV cache repeated) gives the
    tokens of the per-row pre-fill, greedy and seeded, and log-probs equal to float noise; with
    the lean decoder and with the model's forward."""
    from posttrain.decoder import LeanDecoder
    from posttrain.rollout import GenerationConfig, _decode_loop, _pad_left
    from posttrain.sampling import StopChecker as _StopChecker

    model, tok = tiny
    prompts = [tok("Convert 3 feet to inches.")["input_ids"], tok("hello world")["input_ids"]]
    groups = [0, 0, 0, 1, 1, 1]
    ids, mask = _pad_left([prompts[g] for g in groups], tok.pad_token_id)
    cfg = GenerationConfig(max_new_tokens=12, temperature=temperature)
    args = (model, ids, mask, cfg, [tok.eos_token_id], tok.pad_token_id, _StopChecker(tok, []))
    seeds = [11, 12, 13, 21, 22, 23]
    with torch.no_grad():
        dec = LeanDecoder.build(model) if lean else None
        assert (dec is not None) == lean
        plain = _decode_loop(*args, seeds, lean=dec)
        shared = _decode_loop(*args, seeds, groups, lean=dec)
    assert torch.equal(plain.ids, shared.ids) and torch.equal(plain.mask, shared.mask)
    torch.testing.assert_close(plain.logp, shared.logp, atol=1e-5, rtol=1e-5)
    assert plain.reasons == shared.reasons
    if temperature > 0:  # the three samples of a prompt differ: the cache copies are independent
        assert not torch.equal(shared.ids[0], shared.ids[1])


def test_dpo_pair_logps_run_each_prompt_once_with_the_same_result(tiny):
    """dpo.pair_logps (chosen and rejected share the prompt's forward) equals the per-row sum of
    completion log-probs, values and gradients."""
    from posttrain.algos.dpo import pair_logps
    from posttrain.forwards import completion_logps
    from posttrain.ops import masked_sum
    from posttrain.preferences import collate_pairs

    model, tok = tiny
    enc = lambda s: tok(s)["input_ids"]  # noqa: E731
    items = [
        {"prompt_ids": enc("Convert 3 feet to inches."), "chosen_ids": enc(" 36 inches"),
         "rejected_ids": enc(" 12"), "index": 0},
        {"prompt_ids": enc("hello"), "chosen_ids": enc(" world, hello"),
         "rejected_ids": enc(" bad ending of the film"), "index": 1},
    ]  # fmt: skip
    batch = collate_pairs(items, tok.pad_token_id)
    out = []
    for fn in (
        lambda: pair_logps(model, batch),
        lambda: masked_sum(
            completion_logps(model, batch.input_ids, batch.attention_mask, batch.n_completion),
            batch.mask,
            dim=1,
        ),
    ):
        model.zero_grad()
        logp = fn()
        (logp * torch.tensor([1.0, 2.0, -1.0, 0.5])).sum().backward()
        out.append((logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(out[0][0], out[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], atol=1e-5, rtol=1e-4)


def test_actor_critic_shared_prompt_logits_values_and_grads_match(tiny):
    """ActorCritic with groups (each prompt run once, hidden states of the completion positions
    from the cached pass) gives the plain pass's logits, values and gradients."""
    from posttrain.value_head import ActorCritic, ValueHead, hidden_size

    model, tok = tiny
    ids, mask, groups, T = _batch(tok)
    head = ValueHead(hidden_size(model))
    torch.nn.init.normal_(head.summary.weight, std=0.1)  # a zero head would hide the values
    ac = ActorCritic(model, head)
    cmask = mask[:, -T:].float()
    out = []
    for g in (None, groups):
        ac.zero_grad()
        logits, values = ac(ids, mask, T, 0.8, g)
        logp = selective_log_softmax(logits, ids[:, -T:])
        ((logp + values) * cmask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in ac.parameters() if p.grad is not None])
        out.append((logp.detach() * cmask, values.detach() * cmask, grads))
    for a, b in zip(out[0], out[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_shared_prompt_under_activation_checkpointing_takes_the_plain_pass(tiny):
    """Activation checkpointing keeps no KV cache: the plain per-row pass, same numbers."""
    model, tok = tiny
    ids, mask, groups, T = _batch(tok)
    model.activation_checkpointing_enable()
    model.train()
    try:
        a = completion_logits(model, ids, mask, T)
        b = completion_logits_shared(model, ids, mask, T, groups=groups)
    finally:
        model.activation_checkpointing_disable()
        model.eval()
    assert torch.equal(a, b)


def _prefixed_batch(tok, n: int):
    """Three prompts that start with the same system text and differ after it (different
    lengths, left-padded) x n samples each, completions of 3 tokens, the last one shorter."""
    system = "system: You convert units. Be concise. Write the final number inside answer tags. "
    questions = ["How many grams per 6 kg?", "Convert 3 feet to inches.", "hello world"]
    prompts = [tok(system + q)["input_ids"] for q in questions]
    P = max(len(p) for p in prompts)
    g = torch.Generator().manual_seed(1)
    ids, mask, groups = [], [], []
    for i, p in enumerate(prompts):
        for j in range(n):
            k = 2 if j == n - 1 else 3
            comp = torch.randint(3, tok.vocab_size, (3,), generator=g).tolist()
            ids.append(
                [tok.pad_token_id] * (P - len(p)) + p + comp[:k] + [tok.pad_token_id] * (3 - k)
            )
            mask.append([0] * (P - len(p)) + [1] * (len(p) + k) + [0] * (3 - k))
            groups.append(i)
    return torch.tensor(ids), torch.tensor(mask), torch.tensor(groups), 3


@pytest.mark.parametrize("n", [1, 2])
def test_common_system_prompt_runs_once_with_the_plain_numbers(tiny, n):
    """Distinct prompts (n = 1) or groups of samples (n = 2) that share a long start: the start
    runs once for all rows; log-probs, gradients and the value head's hidden states match the
    plain per-row pass."""
    from posttrain.forwards import MIN_SHARED_PREFIX, common_prefix, shared_prompt_forward

    model, tok = tiny
    ids, mask, groups, T = _prefixed_batch(tok, n)
    P = ids.shape[1] - T
    first = torch.tensor([groups.tolist().index(i) for i in range(3)])
    assert common_prefix(ids[first, :P], mask[first, :P]) >= MIN_SHARED_PREFIX
    cmask = mask[:, -T:].float()
    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    out = {}
    for name in ("plain", "shared"):
        model.zero_grad()
        if name == "plain":
            logits = completion_logits(model, ids, mask, T)
            hidden = None
        else:
            calls["n"] = 0
            logits, hidden = shared_prompt_forward(model, ids, mask, T, groups=groups, hidden_states=True)  # fmt: skip
            assert calls["n"] == 3  # the common start, the rest of each prompt, the completions
        logp = selective_log_softmax(logits, ids[:, -T:])
        (logp * cmask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[name] = (logp.detach() * cmask, grads, hidden)
    hook.remove()
    torch.testing.assert_close(out["shared"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["shared"][1], out["plain"][1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0))  # fmt: skip
        want = plain.hidden_states[-1][:, -(T + 1) : -1]
    torch.testing.assert_close(out["shared"][2].detach() * cmask[..., None], want * cmask[..., None], atol=1e-5, rtol=1e-5)  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_runs_a_common_system_prompt_once_with_the_same_result(tiny, temperature):
    """Prompts sharing a long start, sampled together (the start pre-filled once) or one by one
    (nothing shared): the same tokens, log-probs within float noise."""
    from posttrain.rollout import GenerationConfig, generate

    model, tok = tiny
    system = "system: You convert units. Be concise. Write the final number inside answer tags. "
    prompts = [system + q for q in ["How many grams per 6 kg?", "Convert 3 feet to inches.", "hi"]]
    cfg = GenerationConfig(temperature=temperature, max_new_tokens=8, n=2)
    both = generate(model, tok, prompts, cfg, seeds=[3, 4, 5])
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], cfg, seeds=[3 + i])
        rows = (both.prompt_index == i).nonzero().flatten()
        for j, r in enumerate(rows.tolist()):
            m = alone.completion_mask[j].bool()
            assert (
                both.completion_ids[r][: int(m.sum())].tolist()
                == alone.completion_ids[j][m].tolist()
            )
            torch.testing.assert_close(both.logp[r][: int(m.sum())], alone.logp[j][m], atol=1e-4, rtol=1e-4)  # fmt: skip


def test_a_kept_system_prompt_is_reused_by_later_prefills(tiny):
    """`forwards.SharedStart`: the first prompt_pass keeps its common start; later passes (other
    prompts, one row, a start shared only in part) reuse its cache without running it and give
    the logits of a pass without it; prompts that do not share it take the plain pass."""
    from posttrain.forwards import MIN_SHARED_PREFIX, SharedStart, prompt_pass

    model, tok = tiny
    system = "system: You convert units. Be concise. Write the final number inside answer tags. "

    def batch(texts):
        rows = [tok(t)["input_ids"] for t in texts]
        P = max(len(r) for r in rows)
        ids = torch.tensor([[tok.pad_token_id] * (P - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (P - len(r)) + [1] * len(r) for r in rows])
        return ids, mask

    calls = {"n": 0}
    hook = model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    start = SharedStart()
    cases = [  # texts, forwards with the kept start, whether it is reused
        ([system + "How many grams per 6 kg?", system + "hi"], 2, False),  # keeps it
        ([system + "Convert 3 feet to inches.", system + "What is 2 m in cm?"], 1, True),
        ([system + "one row"], 1, True),
        (
            ["system: You convert units. Be brief.", "system: You convert units. Be kind, ok?"],
            1,
            True,
        ),
        (["hello world", "Convert 3 feet to inches."], 1, False),  # shares nothing
    ]
    with torch.no_grad():
        for texts, n_calls, reused in cases:
            ids, mask = batch(texts)
            calls["n"] = 0
            out, full = prompt_pass(model, ids, mask, start=start)
            assert calls["n"] == n_calls, texts
            want, want_mask = prompt_pass(model, ids, mask)  # without the kept start
            torch.testing.assert_close(out.logits[:, -1], want.logits[:, -1], atol=1e-5, rtol=1e-5)
            if reused:
                c = start.match(ids, mask)
                assert MIN_SHARED_PREFIX <= c <= len(start.ids)
                assert full.shape[1] == c + int((mask.sum(1) - c).max())
    hook.remove()
    assert len(start.ids) >= len(tok(system)["input_ids"]) - 1


@pytest.mark.parametrize("continuous", [False, True])
def test_generate_runs_a_common_system_prompt_once_per_call(tiny, continuous):
    """Micro-batches and continuous-batching refills share one pass of the system prompt per
    generate call; the tokens are those of prompts sampled one by one."""
    from posttrain.rollout import GenerationConfig, generate

    model, tok = tiny
    system = "system: You convert units. Be concise. Write the final number inside answer tags. "
    questions = ["How many grams per 6 kg?", "Convert 3 feet to inches.", "hi", "2 m in cm?", "x"]
    prompts = [system + q for q in questions]
    starts = {"n": 0}

    def count(module, args, kwargs):  # a one-row pass from position 0: the system prompt's
        pos = kwargs.get("position_ids")
        if pos is not None and pos.shape[0] == 1 and int(pos[0, 0]) == 0 and pos.shape[1] > 1:
            starts["n"] += 1

    hook = model.register_forward_pre_hook(count, with_kwargs=True)
    cfg = GenerationConfig(temperature=1.0, max_new_tokens=6, continuous_batching=continuous)
    out = generate(model, tok, prompts, cfg, seeds=list(range(5)), batch_size=2)
    hook.remove()
    assert starts["n"] == 1
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], cfg, seeds=[i])
        m = alone.completion_mask[0].bool()
        assert out.completion_ids[i][: int(m.sum())].tolist() == alone.completion_ids[0][m].tolist()
        torch.testing.assert_close(out.logp[i][: int(m.sum())], alone.logp[0][m], atol=1e-4, rtol=1e-4)  # fmt: skip
