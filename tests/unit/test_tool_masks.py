"""Tool-inserted tokens in online RL: attended to, but no log-prob, loss, KL, advantage or length.

Hand-built rollouts carry a tool_mask; the losses of REINFORCE, GRPO/RLOO and PPO are checked
against numbers worked out by hand over the policy's own tokens only.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.advantages import gae
from posttrain.algos.grpo import clipped_policy_loss
from posttrain.algos.ppo import per_token_rewards, value_loss
from posttrain.algos.reinforce import reinforce_loss
from posttrain.online import Scores, score_rollout, take
from posttrain.online_run import rollout_metrics, sample_records
from posttrain.ops import clipped_surrogate
from posttrain.rollout import GenerationConfig, Rollout, generate
from posttrain.tools import ToolCall


def _rollout(completion_mask, tool_mask, logp=None, P: int = 2) -> Rollout:
    """A rollout of B rows, prompts of P tokens, the given (B, T) masks."""
    cm = torch.tensor(completion_mask, dtype=torch.float)
    tm = torch.tensor(tool_mask, dtype=torch.float)
    B, T = cm.shape
    return Rollout(
        prompt_ids=torch.full((B, P), 5),
        prompt_mask=torch.ones(B, P, dtype=torch.long),
        completion_ids=torch.arange(B * T).reshape(B, T) % 50 + 10,
        completion_mask=cm,
        logp=torch.zeros(B, T) if logp is None else torch.tensor(logp),
        prompts=["p"] * B,
        completions=["c"] * B,
        prompt_index=torch.arange(B),
        finish_reasons=["length"] * B,
        tool_mask=tm,
        tool_calls=[[ToolCall("calc", "1+2", "3")] if tm[i].any() else [] for i in range(B)],
    )


# row 0: sampled, tool, tool, sampled (a call and its result inside the completion)
ONE = _rollout([[1, 1, 1, 1]], [[0, 1, 1, 0]])
LOGP = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])  # what a training forward gives, tool tokens too


def test_take_attends_to_tool_tokens_and_masks_them_out_of_the_loss():
    """Width and attention from the completion mask, `mask` from the policy mask: row 0 has 4
    completion tokens of which 2 are the policy's; a width from the policy mask (2) would cut its
    last sampled token."""
    roll = _rollout([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    mb = take(roll, torch.tensor([0]))
    assert mb.T == 4
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1]]
    assert mb.mask.tolist() == [[1, 0, 0, 1]]
    both = take(roll, torch.arange(2), returns=torch.ones(2, 5), adv=torch.ones(2))
    assert both.T == 4 and both.returns.shape == (2, 4) and both.adv.shape == (2,)
    assert both.mask.tolist() == [[1, 0, 0, 1], [1, 1, 1, 0]]
    assert both.old_logp is None and both.completion_ids.shape == (2, 4)
    assert roll.num_tokens == 5


def test_reinforce_loss_over_policy_tokens_hand_computed():
    """adv 2, logp (-1, [-2, -3], -4) with the bracketed tokens from a tool:
    policy term -2 * (-1 - 4) = 10 (not -2 * -10 = 20); k1 KL to ref (-1.5, [0, 0], -3) is
    (0.5 + (-1)) = -0.5, times kl_coef 0.5 -> -0.25; total 9.75."""
    mask = take(ONE, torch.tensor([0])).mask
    ref = torch.tensor([[-1.5, 0.0, 0.0, -3.0]])
    loss, m = reinforce_loss(
        LOGP, mask, torch.tensor([2.0]), ref_logp=ref, kl_coef=0.5, kl_estimator="k1"
    )
    assert float(m["loss/policy"]) == pytest.approx(10.0)
    assert float(m["loss/kl"]) == pytest.approx(-0.25)
    assert float(loss) == pytest.approx(9.75)


@pytest.mark.parametrize(
    "reduction, want", [("fixed", -(math.exp(0.1) + 1) / 4), ("seq_mean", -(math.exp(0.1) + 1) / 2)]
)
def test_clipped_loss_over_policy_tokens_hand_computed(reduction, want):
    """GRPO/RLOO: old_logp (-1.1, [-9, -9], -4): ratios e^0.1 and 1 on the sampled tokens (e^7 and
    e^6 on the tool's, which would be clipped); A = 1, eps 0.2, none clipped. fixed (N = 4):
    -(e^0.1 + 1) / 4; seq_mean: -(e^0.1 + 1) / 2. The k3 KL to a ref equal to logp on the sampled
    tokens (and far off on the tool's) is 0."""
    mask = take(ONE, torch.tensor([0])).mask
    old = torch.tensor([[-1.1, -9.0, -9.0, -4.0]])
    ref = torch.tensor([[-1.0, 0.0, 0.0, -4.0]])
    loss, m = clipped_policy_loss(
        LOGP, old, torch.tensor([1.0]), mask, ref_logp=ref, kl_coef=0.1,
        reduction=reduction, normaliser=4,
    )  # fmt: skip
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(m["loss/kl"]) == 0.0
    assert float(m["ratio"]) == pytest.approx((math.exp(0.1) + 1) / 2, rel=1e-6)
    assert float(m["clip_fraction"]) == 0.0


def test_ppo_rewards_gae_and_losses_skip_tool_tokens_hand_computed():
    """PPO over (a, [tool, tool], b):
    rewards: -beta kl on a and b, score 2 on b: kl (0.1, [5, 5], 0.2), beta 0.5 -> (-0.05, 0, 0, 1.9).
    GAE (gamma 1, lam 0.95), values (0.5, [9, 9], 0.25): the tool tokens are skipped, not an end:
      A_b = 1.9 - 0.25 = 1.65;  A_a = (-0.05 + 0.25 - 0.5) + 0.95 * 1.65 = 1.2675
    returns (1.7675, 0, 0, 1.9): as GAE over the two actions alone.
    policy loss, old = logp on a and b, adv (1, [5, 5], -2): token mean of (-1, 2) = 0.5.
    value loss, returns (1, [0, 0], 1): 0.5 * ((0.5 - 1)^2 + (0.25 - 1)^2) / 2 = 0.203125."""
    mask = take(ONE, torch.tensor([0])).mask
    rewards = per_token_rewards(
        torch.tensor([2.0]), torch.tensor([[0.1, 5.0, 5.0, 0.2]]) * mask, mask, beta=0.5
    )
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.0, 1.9]]))
    values = torch.tensor([[0.5, 9.0, 9.0, 0.25]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[1.2675, 0.0, 0.0, 1.65]]))
    torch.testing.assert_close(ret, torch.tensor([[1.7675, 0.0, 0.0, 1.9]]))
    a2, r2 = gae(rewards[:, [0, 3]], values[:, [0, 3]], torch.ones(1, 2), gamma=0.9, lam=0.5)
    a4, r4 = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(a4[:, [0, 3]], a2)
    torch.testing.assert_close(r4[:, [0, 3]], r2)

    old = torch.tensor([[-1.0, -9.0, -9.0, -4.0]])
    pg, m = clipped_surrogate(
        LOGP, old, torch.tensor([[1.0, 5.0, 5.0, -2.0]]), mask, clip_range=0.2
    )
    assert float(pg) == pytest.approx(0.5) and float(m["ratio"]) == pytest.approx(1.0)
    returns = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    vf, _ = value_loss(values, values, returns, mask, clip_range_value=0.2)
    assert float(vf) == pytest.approx(0.203125)


def test_ppo_score_goes_on_the_last_sampled_token():
    """A completion cut while a tool result was being fed ends on tool tokens: the score goes on
    the last token the policy sampled, not on the last completion token."""
    roll = _rollout([[1, 1, 1, 1], [1, 1, 1, 0]], [[0, 0, 1, 1], [0, 0, 0, 0]])
    mask = roll.policy_mask
    rewards = per_token_rewards(torch.tensor([1.0, 3.0]), torch.zeros(2, 4), mask, beta=0.1)
    assert rewards.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]


def test_rollout_metrics_and_samples_count_policy_tokens_and_record_calls():
    """completion_length and the sequence KL run over the sampled tokens; tools/* describe the
    calls; samples.jsonl records carry them."""
    roll = _rollout([[1, 1, 1, 1], [1, 1, 0, 0]], [[0, 1, 1, 0], [0, 0, 0, 0]])
    old = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, 0.0, 0.0, -3.0], [-2.0, -1.0, 0.0, 0.0]])
    scores = Scores(old_logp=old, ref_logp=ref, entropy=torch.ones(2, 4))
    out = SimpleNamespace(
        valid=torch.tensor([True, True]), total=torch.tensor([1.0, 0.0]), raw_total=None,
        components={},
    )  # fmt: skip
    m = rollout_metrics(roll, out, scores, SimpleNamespace(metrics=lambda out: {}))
    assert m["completion_length"] == 2.0  # (2 + 2) / 2, the tool's 2 tokens left out
    # k1 per row over the sampled tokens: (0.5 - 1) = -0.5 and (1 + 0) = 1 -> mean 0.25
    assert m["kl/k1"] == pytest.approx(0.25)
    assert (m["tools/calls"], m["tools/errors"], m["tools/tokens"]) == (0.5, 0.0, 1.0)
    recs = sample_records(roll, out, torch.zeros(2), 2)
    assert recs[0]["tool_calls"] == [{"tool": "calc", "call": "1+2", "result": "3", "error": False}]
    assert recs[1]["tool_calls"] == []
    plain = _rollout([[1, 1]], [[0, 0]])
    plain.tool_mask = plain.tool_calls = None
    assert "tool_calls" not in sample_records(plain, out, torch.zeros(1), 1)[0]


def _with_tool_tokens(roll: Rollout, cols: list[int]) -> Rollout:
    """The rollout with columns `cols` of row 0 marked as tool-inserted (their sampler logp 0)."""
    tool = torch.zeros_like(roll.completion_mask)
    tool[0, cols] = 1.0
    roll.tool_mask = tool
    roll.tool_calls = [[] for _ in range(len(roll))]
    roll.logp = roll.logp * (1 - tool)
    return roll


def test_scoring_pass_gives_tool_tokens_nothing(tiny):
    """online.score_rollout and ppo.score_rollout: old_logp, ref_logp, entropy, the exact KL and
    the values are 0 on tool tokens; the other tokens match a forward that attends to the tool
    tokens (the completion mask)."""
    from posttrain.forwards import completion_logps
    from posttrain.online import build_reference
    from posttrain.value_head import ActorCritic, ValueHead, hidden_size

    model, tok = tiny
    torch.manual_seed(0)
    roll = generate(
        model, tok, ["hello world", "The movie was"], GenerationConfig(max_new_tokens=6)
    )
    roll = _with_tool_tokens(roll, [2, 3])
    ref = build_reference("copy", model, 0.1)
    s = score_rollout(model, ref, roll, temperature=1.0, n_micro=2, exact=True)
    full = completion_logps(
        model, roll.input_ids, roll.attention_mask, roll.completion_ids.shape[1]
    )
    pm = roll.policy_mask
    for k in ("old_logp", "ref_logp", "entropy", "kl_exact"):
        assert getattr(s, k)[0, 2:4].abs().sum() == 0, k
    torch.testing.assert_close(s.old_logp, full * pm, atol=1e-5, rtol=0)
    assert s.old_logp[0, 4] != 0  # after the tool's tokens: scored, with them in context
    head = ValueHead(hidden_size(model))
    torch.nn.init.normal_(head.summary.weight)
    ac = ActorCritic(model, head)
    p = score_rollout(ac, None, roll, temperature=1.0, n_micro=1, forward=ac)
    assert p.values[0, 2:4].abs().sum() == 0 and p.old_logp[0, 2:4].abs().sum() == 0
    torch.testing.assert_close(p.old_logp, full * pm, atol=1e-5, rtol=0)


def test_scoring_pass_runs_with_dropout_off(tiny):
    """Issue #16: `generate` puts the policy back in train mode, so a scoring pass run as is saw
    LoRA dropout: old_logp then differs from the policy's log-probs and the first ratio from 1.
    The scoring pass runs in eval mode and leaves the model's mode as it found it."""
    from posttrain.config import LoraConfig
    from posttrain.forwards import completion_logps
    from posttrain.models import apply_lora

    model, tok = tiny
    model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.5))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at 0, where dropout on the adapter's input shows nothing
            torch.nn.init.normal_(p, std=0.5)
    model.train()
    roll = generate(
        model, tok, ["hello world", "The movie was"], GenerationConfig(max_new_tokens=5)
    )
    assert model.training
    s = score_rollout(model, None, roll, temperature=1.0, n_micro=1)
    assert model.training
    model.eval()
    with torch.no_grad():
        want = completion_logps(model, roll.input_ids, roll.attention_mask, 5)
    torch.testing.assert_close(s.old_logp, want * roll.completion_mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.old_logp, roll.logp, atol=1e-4, rtol=0)
