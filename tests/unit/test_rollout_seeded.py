"""Seeded sampling: a row's tokens follow from its prompt's seed and its sample index alone;
PromptStream.draw gives each prompt a seed from its global position in the stream."""

from __future__ import annotations

import torch

from posttrain.online import PromptStream
from posttrain.rollout import GenerationConfig, generate
from posttrain.sampling import inverse_cdf as _inverse_cdf
from posttrain.sampling import mix_seed
from posttrain.sampling import row_uniforms as _row_uniforms

PROMPT = "How many grams"
OTHERS = ["Convert 3 feet to inches. It is a very long prompt with many words in it", "hi"]
CFG = GenerationConfig(temperature=1.0, max_new_tokens=10, n=2)


def _rows(roll, prompt_index: int) -> list[list[int]]:
    """The sampled ids of one prompt's rows, padding dropped."""
    out = []
    for i in (roll.prompt_index == prompt_index).nonzero().flatten().tolist():
        out.append(roll.completion_ids[i][roll.completion_mask[i].bool()].tolist())
    return out


def test_same_seed_same_completion_whatever_the_batch(tiny):
    """Alone, in the middle of a batch of 3 (longer and shorter prompts: other padding), one row
    per micro-batch, and a 2-row micro-batch budget: the prompt's two samples are the same."""
    model, tok = tiny
    alone = generate(model, tok, [PROMPT], CFG, seeds=[7])
    torch.manual_seed(123)  # the global RNG plays no part
    batch = generate(model, tok, [OTHERS[0], PROMPT, OTHERS[1]], CFG, seeds=[1, 7, 2])
    one_row = generate(model, tok, [OTHERS[1], PROMPT], CFG, seeds=[5, 7], batch_size=1)
    small = GenerationConfig(temperature=1.0, max_new_tokens=10, n=2, max_batch_size=2)
    two_rows = generate(model, tok, [PROMPT, *OTHERS], small, seeds=[7, 3, 4])
    expected = _rows(alone, 0)
    assert _rows(batch, 1) == expected
    assert _rows(one_row, 1) == expected
    assert _rows(two_rows, 0) == expected
    assert alone.completions == [batch.completions[2], batch.completions[3]]
    # the sampler's log-probs are those of the same tokens
    n = len(expected[0])
    torch.testing.assert_close(batch.logp[2, :n], alone.logp[0, :n], atol=1e-5, rtol=1e-4)


def test_other_seeds_and_other_sample_indices_differ(tiny):
    """10 tokens from a near-uniform random model: two streams agreeing would be a broken seed."""
    model, tok = tiny
    a = _rows(generate(model, tok, [PROMPT], CFG, seeds=[7]), 0)
    b = _rows(generate(model, tok, [PROMPT], CFG, seeds=[8]), 0)
    assert a[0] != a[1]  # sample 0 and sample 1 of one prompt
    assert a[0] != b[0] and a[1] != b[1]


def test_seeds_leave_greedy_alone(tiny):
    model, tok = tiny
    greedy = GenerationConfig(temperature=0.0, max_new_tokens=8)
    plain = generate(model, tok, [PROMPT, *OTHERS], greedy)
    seeded = generate(model, tok, [PROMPT, *OTHERS], greedy, seeds=[1, 2, 3])
    assert torch.equal(plain.completion_ids, seeded.completion_ids)


def test_inverse_cdf_by_hand():
    """probs [0.2, 0, 0.5, 0.3] -> cdf [0.2, 0.2, 0.7, 1.0]; the token is the first index whose
    cdf exceeds u: u < 0.2 -> 0, 0.2 <= u < 0.7 -> 2 (never the zero-probability 1),
    u >= 0.7 -> 3. Unnormalised weights [2, 0, 5, 3] give the same (u is scaled by the total).
    u = 1 (beyond [0, 1), as rounding could give) stays on the last token with probability > 0."""
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    u = torch.tensor([0.0, 0.19, 0.2, 0.69, 0.7, 0.999], dtype=torch.float64)
    expected = [0, 0, 2, 2, 3, 3]
    assert _inverse_cdf(probs.expand(6, 4), u).tolist() == expected
    assert _inverse_cdf((probs * 10).expand(6, 4), u).tolist() == expected
    tail_zero = torch.tensor([[0.5, 0.5, 0.0]])
    assert _inverse_cdf(tail_zero, torch.tensor([1.0], dtype=torch.float64)).tolist() == [1]


def test_blocked_inverse_cdf_equals_the_plain_scan():
    """The two-level search picks what one cumsum over the vocabulary picks: across block
    edges, with a vocabulary that is not a multiple of the block, whole blocks of zeros (top-k)
    and draws at 0 and rounded up to 1."""
    from posttrain.sampling import _scan

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 1000, generator=g) ** 4
    probs[:8, 100:700] = 0.0  # empty blocks inside
    probs[8:16, 900:] = 0.0  # an empty tail
    u = torch.rand(64, dtype=torch.float64, generator=g)
    u[0], u[1], u[8], u[9] = 0.0, 1.0, 1.0, 0.999999999
    for block in (7, 64, 256):
        picked = _inverse_cdf(probs, u, block=block)
        assert torch.equal(picked, _scan(probs, u))
        assert bool((probs.gather(1, picked[:, None]) > 0).all())


def test_seeded_draws_follow_the_distribution():
    """20,000 rows, one seed each (consecutive prompt seeds, as PromptStream gives): token
    frequencies within 0.015 of [0.2, 0, 0.5, 0.3] (4 standard errors is ~0.014)."""
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    seeds = [mix_seed(s, 0) for s in range(20_000)]
    u = _row_uniforms(seeds, 1)[:, 0]
    freq = torch.bincount(_inverse_cdf(probs.expand(len(seeds), 4), u), minlength=4) / len(seeds)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_mix_seed_is_deterministic_and_spreads():
    assert mix_seed(3, 0) == mix_seed(3, 0)
    seeds = {mix_seed(s, j) for s in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


def test_prompt_stream_seeds_follow_the_global_position():
    """Process r of 2 draws global positions r, r + 2, ...: its rows and seeds are those one
    process draws at the same positions; a restored counter continues with the same seeds."""
    rows = [{"prompt": str(i)} for i in range(5)]
    one = PromptStream(rows, seed=3)
    rows1, seeds1 = one.draw(4)
    (rows_a, seeds_a), (rows_b, seeds_b) = [PromptStream(rows, 3, r, 2).draw(2) for r in (0, 1)]
    assert rows_a == rows1[0::2] and seeds_a == seeds1[0::2]
    assert rows_b == rows1[1::2] and seeds_b == seeds1[1::2]
    assert len(set(seeds1)) == 4
    again = PromptStream(rows, seed=3)
    again.load_state_dict(one.state_dict())
    assert again.draw(3) == one.draw(3)  # crosses the epoch boundary (5 rows)
    assert PromptStream(rows, seed=4).draw(4)[1] != seeds1
