"""PPO maths against hand-computed numbers, and the value head / rollout scoring on a tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.algos.ppo import (
    AdaptiveKLController,
    Config,
    FixedKLController,
    entropy_loss,
    per_token_rewards,
    value_loss,
)
from posttrain.config import load_config
from posttrain.online import build_reference, score_rollout
from posttrain.ops import clipped_surrogate, explained_variance
from posttrain.rollout import GenerationConfig
from posttrain.value_head import (
    ActorCritic,
    ValueHead,
    hidden_size,
    load_value_head,
    save_value_head,
)

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])


def test_policy_loss_hand_computed():
    """eps = 0.2, four real tokens (the third column is padding holding junk):

    ratio 1.5, adv +1: -1.5 vs clipped -1.2 -> max -1.2 (clipped)
    ratio 0.5, adv -1:  0.5 vs clipped  0.8 -> max  0.8 (clipped)
    ratio 1.1, adv -2:  2.2 vs clipped  2.2 ->      2.2 (inside the range)
    ratio 0.5, adv +2: -1.0 vs clipped -1.6 -> max -1.0 (unclipped: the pessimistic term)
    token mean = (-1.2 + 0.8 + 2.2 - 1.0) / 4 = 0.2; clipfrac = 2 / 4.
    """
    ratio = torch.tensor([[1.5, 0.5, 9.0], [1.1, 0.5, 9.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.0]])
    adv = torch.tensor([[1.0, -1.0, 5.0], [-2.0, 2.0, 5.0]])
    loss, m = clipped_surrogate(old + ratio.log(), old, adv, MASK, clip_range=0.2)
    assert loss.item() == pytest.approx(0.2, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    # approx_kl = mean((r - 1) - log r)
    r = torch.tensor([1.5, 0.5, 1.1, 0.5])
    assert m["approx_kl"].item() == pytest.approx(((r - 1) - r.log()).mean().item(), abs=1e-6)
    # seq_mean: row means (-1.2 + 0.8) / 2 = -0.2 and (2.2 - 1.0) / 2 = 0.6 -> 0.2 as well
    loss_seq, _ = clipped_surrogate(
        old + ratio.log(), old, adv, MASK, clip_range=0.2, reduction="seq_mean"
    )
    assert loss_seq.item() == pytest.approx(0.2, abs=1e-6)


def test_value_loss_hand_computed():
    """c = 0.2, loss_t = 0.5 * max((v - R)^2, (v_clip - R)^2):

    v 1.0, old 0.5, R 1.5:   v_clip 0.7;  0.25 vs 0.64 -> 0.32 (clipped)
    v 0.0, old 0.1, R -1.0:  v_clip 0.0;  1.00 vs 1.00 -> 0.50
    v 2.0, old 1.0, R 2.0:   v_clip 1.2;  0.00 vs 0.64 -> 0.32 (clipped)
    v -0.5, old 0.0, R 0.5:  v_clip -0.2; 1.00 vs 0.49 -> 0.50 (moving away: unclipped)
    token mean = 1.64 / 4 = 0.41; value clip_fraction = 2 / 4.
    """
    values = torch.tensor([[1.0, 0.0, 7.0], [2.0, -0.5, 7.0]])
    old = torch.tensor([[0.5, 0.1, 0.0], [1.0, 0.0, 0.0]])
    returns = torch.tensor([[1.5, -1.0, -7.0], [2.0, 0.5, -7.0]])
    loss, m = value_loss(values, old, returns, MASK, clip_range_value=0.2)
    assert loss.item() == pytest.approx(0.41, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(0.5)


def test_entropy_loss_uniform():
    """Uniform logits over V = 4: entropy ln 4 at every token, loss -ln 4."""
    from posttrain.ops import entropy_from_logits

    ent = entropy_from_logits(torch.zeros(2, 3, 4))
    loss, m = entropy_loss(ent, MASK)
    assert loss.item() == pytest.approx(-math.log(4), abs=1e-6)
    assert m["entropy"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_on_policy_clipped_loss_is_reinforce_with_advantage():
    """With one epoch on the rollout batch, logp == old_logp, so ratio = 1 and clipping is
    inactive: the loss is -mean(adv) and its gradient is that of -mean(adv * logp)."""
    torch.manual_seed(0)
    logp = (-torch.rand(2, 3) * 3).requires_grad_()
    adv = torch.randn(2, 3)
    loss, m = clipped_surrogate(logp, logp.detach(), adv, MASK, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    reinforce = -(adv * logp2 * MASK).sum() / MASK.sum()
    (grad2,) = torch.autograd.grad(reinforce, logp2)
    assert torch.allclose(grad, grad2)
    assert loss.item() == pytest.approx(-((adv * MASK).sum() / MASK.sum()).item(), abs=1e-6)
    assert m["ratio"].item() == 1.0 and m["clip_fraction"].item() == 0.0


def test_zero_advantage_gives_zero_policy_gradient():
    logp = (-torch.rand(2, 3)).requires_grad_()
    old = logp.detach() + torch.randn(2, 3) * 0.3  # off-policy: ratios far from 1
    loss, _ = clipped_surrogate(logp, old, torch.zeros(2, 3), MASK, clip_range=0.2)
    (grad,) = torch.autograd.grad(loss, logp)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def test_adaptive_kl_controller_update_rule():
    """beta = 0.2, target 6, horizon 10000, n_steps 256 samples:

    KL 9.0: e = clip(9/6 - 1 = 0.5) = 0.2;   beta = 0.2 * (1 + 0.2 * 0.0256) = 0.201024
    KL 5.4: e = 5.4/6 - 1 = -0.1;            beta = 0.201024 * (1 - 0.00256) = 0.20050937...
    KL 0.0: e = clip(-1) = -0.2;             beta *= 1 - 0.00512
    """
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.201024, rel=1e-12)
    ctl.update(5.4, n_steps=256)
    assert ctl.value == pytest.approx(0.201024 * 0.99744, rel=1e-12)
    before = ctl.value
    ctl.update(0.0, n_steps=256)
    assert ctl.value == pytest.approx(before * 0.99488, rel=1e-12)
    other = AdaptiveKLController(0.2, 6.0, 10000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=256)
    assert fixed.value == 0.05


def test_explained_variance():
    """values [1, 2, 3, 4], returns [2, 2, 4, 4]: residual [1, 0, 1, 0] has variance 0.25 (pop.),
    returns have variance 1, so EV = 1 - 0.25 / 1 = 0.75. A perfect critic gives 1."""
    values = torch.tensor([[1.0, 2.0, 50.0], [3.0, 4.0, -50.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0], [4.0, 4.0, 0.0]])
    assert explained_variance(values, returns, MASK).item() == pytest.approx(0.75, abs=1e-6)
    assert explained_variance(returns, returns, MASK).item() == pytest.approx(1.0)


def test_per_token_rewards():
    """beta 0.5; row 0 has 3 tokens, row 1 one: -beta * kl everywhere, score at the last token."""
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 + 2.0, 0.0, 0.0]])
    assert torch.allclose(r, expected)
    # an invalid (fully masked) row gets nothing
    r0 = per_token_rewards(torch.tensor([3.0]), torch.ones(1, 2), torch.zeros(1, 2), beta=0.5)
    assert torch.count_nonzero(r0) == 0


def test_config_validation_and_shipped_config():
    with pytest.raises(Exception, match="num_minibatches"):
        load_config(Config, None, ["--batch_size=2", "--num_minibatches=4"])
    with pytest.raises(Exception, match="grad_accum"):
        load_config(Config, None, ["--num_minibatches=4", "--optim.grad_accum=4"])
    path = Path(__file__).parents[2] / "configs" / "ppo_summarization.toml"
    cfg = load_config(Config, path)
    assert cfg.task.name == "summarization" and cfg.kl_controller == "adaptive"


def test_old_mini_batch_size_converts_to_num_minibatches(capsys):
    """The old `mini_batch_size` (rows per minibatch) becomes num_minibatches = rows / size,
    read after every other key (here --batch_size, given after it); its old range error stays."""
    cfg = load_config(Config, None, ["--mini_batch_size=3", "--batch_size=6"])
    assert cfg.num_minibatches == 2
    assert "'mini_batch_size' is now 'num_minibatches'" in capsys.readouterr().err
    with pytest.raises(Exception, match="mini_batch_size=4 must be between 1"):
        load_config(Config, None, ["--batch_size=2", "--mini_batch_size=4"])
    with pytest.raises(Exception, match="one key"):
        load_config(Config, None, ["--mini_batch_size=2", "--num_minibatches=2"])


# ---------------------------------------------------------------------------------------------
# On the tiny model


def test_value_head_save_load_round_trip(tmp_path):
    head = ValueHead(8)
    torch.nn.init.normal_(head.summary.weight)
    head.summary.bias.data.fill_(0.5)
    save_value_head(head, tmp_path)
    back = load_value_head(tmp_path)
    h = torch.randn(2, 3, 8)
    assert torch.equal(head(h), back(h))
    with pytest.raises(FileNotFoundError):
        load_value_head(tmp_path / "nowhere")


def test_actor_critic_values_read_the_state_before_each_token(tiny):
    """values[:, t] is the head applied to the hidden state that predicts completion token t."""
    model, _ = tiny
    head = ValueHead(hidden_size(model))
    torch.nn.init.normal_(head.summary.weight)
    ac = ActorCritic(model, head)
    ids = torch.randint(3, 300, (2, 7))
    attn = torch.ones_like(ids)
    logits, values = ac(ids, attn, 3)
    out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    assert torch.allclose(logits, out.logits[:, 3:6], atol=1e-5)
    assert torch.allclose(values, head(out.hidden_states[-1][:, 3:6]), atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_score_rollout_matches_sampling_logps(tiny, lora):
    """Teacher-forced log-probs of the sampled tokens equal the sampler's (the ratio starts at 1);
    a fresh reference (a frozen copy, or the adapter switched off) gives zero KL; values are the
    head on the state before each token."""
    from posttrain.config import LoraConfig
    from posttrain.models import apply_lora
    from posttrain.rollout import generate

    model, tok = tiny
    if lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=4))
    torch.manual_seed(0)
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0)
    roll = generate(model, tok, ["hello world", "The quick brown fox jumps", "Paris"], gen)
    head = ValueHead(hidden_size(model))
    torch.nn.init.normal_(head.summary.weight)
    ac = ActorCritic(model, head)
    ref = build_reference("auto", model, 0.1)
    assert ref is not None and ref.kind == ("adapter" if lora else "copy")
    s = score_rollout(ac, ref, roll, temperature=1.0, n_micro=2, forward=ac)
    mask = roll.completion_mask.float()
    assert torch.allclose(s.old_logp, roll.logp * mask, atol=1e-4)
    assert torch.allclose(s.ref_logp, s.old_logp, atol=1e-5)
    assert s.kl_exact.abs().max().item() < 1e-5
    whole = score_rollout(ac, None, roll, temperature=1.0, n_micro=1, forward=ac)
    assert whole.ref_logp is None
    assert torch.allclose(whole.values, s.values, atol=1e-5)  # micro-batching changes nothing
    assert (s.values * (1 - mask)).abs().sum() == 0 and s.values.abs().sum() > 0


def test_take_drops_left_padding_and_keeps_logps(tiny):
    """`online.take` cuts prompt columns that are padding in every row of a micro-batch: the
    log-probs do not change."""
    from posttrain.forwards import completion_logps
    from posttrain.online import take
    from posttrain.rollout import generate

    model, tok = tiny
    torch.manual_seed(0)
    prompts = ["hi", "The quick brown fox jumps over the lazy dog and more words"]
    roll = generate(model, tok, prompts, GenerationConfig(max_new_tokens=4))
    mb = take(roll, torch.tensor([0]))
    assert mb.input_ids.shape[1] < roll.prompt_ids.shape[1] + roll.completion_ids.shape[1]
    assert mb.attention_mask[0, 0] == 1
    T = mb.T
    ids = torch.cat([roll.prompt_ids[:1], roll.completion_ids[:1, :T]], 1)
    attn = torch.cat([roll.prompt_mask[:1], roll.completion_mask[:1, :T].long()], 1)
    full = completion_logps(model, ids, attn, T)
    cut = completion_logps(model, mb.input_ids, mb.attention_mask, T)
    assert torch.allclose(full, cut, atol=1e-5)


def test_minibatch_loss_zero_advantage_zero_policy_gradient(tiny):
    """Through the real forward: with zero advantages and vf_coef = ent_coef = 0 the policy gets
    no gradient; an entropy bonus (ent_coef > 0) gives it one; the value loss reaches the head."""
    from posttrain.algos.ppo import minibatch_loss
    from posttrain.online import take
    from posttrain.rollout import generate

    model, tok = tiny
    torch.manual_seed(0)
    roll = generate(
        model, tok, ["hello", "The quick brown fox"], GenerationConfig(max_new_tokens=5)
    )
    ac = ActorCritic(model, ValueHead(hidden_size(model)))
    s = score_rollout(ac, None, roll, temperature=1.0, n_micro=1, forward=ac)
    zeros = torch.zeros_like(roll.logp)
    mb = take(roll, torch.arange(2), old_logp=s.old_logp, old_values=s.values, adv=zeros,
              returns=zeros + 1.0, loss_mask=roll.completion_mask)  # fmt: skip

    def grads(**kw):
        ac.zero_grad(set_to_none=True)
        cfg = load_config(Config, None, [f"--{k}={v}" for k, v in kw.items()])
        loss, m = minibatch_loss(ac, mb, cfg, 1.0)
        loss.backward()
        pol = sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None)
        head = ac.value_head.summary.weight.grad
        return float(pol), 0.0 if head is None else float(head.abs().sum()), m

    pol, head, m = grads(vf_coef=0, ent_coef=0)
    assert pol == 0.0 and head == 0.0 and m["ratio"].item() == pytest.approx(1.0, abs=1e-5)
    assert grads(vf_coef=0, ent_coef=0.1)[0] > 0
    assert grads(vf_coef=0.1, ent_coef=0)[1] > 0


def test_rewards_through_gae_give_score_minus_remaining_kl():
    """gamma = lam = 1 and zero values: the return at token t is the score minus beta times the KL
    of tokens t..end, e.g. row 0 (3 tokens, score 1, kl 0.1/0.2/0.3, beta 0.5):
    returns = [1 - 0.3, 1 - 0.25, 1 - 0.15] = [0.7, 0.75, 0.85]; row 1 (1 token): [2 - 0.25]."""
    from posttrain.advantages import gae

    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = per_token_rewards(torch.tensor([1.0, 2.0]), kl, mask, beta=0.5)
    adv, returns = gae(r, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[0.7, 0.75, 0.85], [1.75, 0.0, 0.0]]))
    assert torch.allclose(adv, returns)


def test_separate_critic_values_and_frozen_lm_head(tiny_dir):
    """With a separate critic the values come from the critic's trunk, and its unused LM head is
    frozen (untied in the tiny model)."""
    from posttrain.models import load_model
    from posttrain.value_head import prepare_critic

    policy, _ = load_model(str(tiny_dir))
    critic = prepare_critic(load_model(str(tiny_dir))[0])
    assert not critic.lm_head.weight.requires_grad and critic.model.norm.weight.requires_grad
    head = ValueHead(hidden_size(policy))
    torch.nn.init.normal_(head.summary.weight)
    ac = ActorCritic(policy, head, critic)
    with torch.no_grad():
        critic.model.norm.weight.mul_(2.0)  # the critic now differs from the policy
    ids = torch.randint(3, 300, (2, 7))
    attn = torch.ones_like(ids)
    _, values = ac(ids, attn, 3)
    hidden = critic(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    assert torch.allclose(values, head(hidden[-1][:, 3:6]), atol=1e-5)


def test_fixed_reduction_micro_batch_1x4_equals_4x1(tiny):
    """Issue #16: `take` trims a micro-batch to its longest completion, so a `fixed` reduction
    normalised by the micro-batch's width changed with the grouping of ragged rows. With the run's
    constant (max_new_tokens) four micro-batches of one row, each weighted by
    `accumulation_weight`, give the gradient of one batch of four."""
    from posttrain.algos.ppo import minibatch_loss
    from posttrain.online import accumulation_weight, take
    from posttrain.rollout import generate

    model, tok = tiny
    torch.manual_seed(0)
    prompts = ["hello", "The quick brown fox", "Paris", "This film is"]
    roll = generate(model, tok, prompts, GenerationConfig(max_new_tokens=6))
    lengths = torch.tensor([2, 6, 3, 5])
    roll.completion_mask = (torch.arange(6)[None] < lengths[:, None]).float()
    ac = ActorCritic(model, ValueHead(hidden_size(model)))
    torch.nn.init.normal_(ac.value_head.summary.weight, std=0.1)
    s = score_rollout(ac, None, roll, temperature=1.0, n_micro=1, forward=ac)
    g = torch.Generator().manual_seed(1)
    per_row = {
        "old_logp": s.old_logp - 0.1 * torch.rand(4, 6, generator=g),  # ratios != 1
        "old_values": s.values,
        "adv": torch.randn(4, 6, generator=g),
        "returns": torch.randn(4, 6, generator=g),
        "loss_mask": roll.completion_mask,
    }
    cfg = load_config(Config, None, ["--loss_reduction=fixed", "--ent_coef=0.01"])
    params = [p for p in ac.parameters() if p.requires_grad]

    def grad(rows, normaliser):
        mb = take(roll, rows, **per_row)
        loss, _ = minibatch_loss(ac, mb, cfg, 1.0, normaliser=normaliser)
        w = accumulation_weight(mb.loss_mask, "fixed", step_rows=4, step_tokens=0)
        return torch.autograd.grad(loss * w, params, allow_unused=True)

    def accumulated(normaliser):
        parts = [grad(torch.tensor([i]), normaliser) for i in range(4)]
        return [sum(p[k] for p in parts) if parts[0][k] is not None else None for k in range(len(params))]  # fmt: skip

    def close(a, b):
        return all(x is None or torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    assert close(accumulated(6), grad(torch.arange(4), 6))
    assert not close(accumulated(None), grad(torch.arange(4), None))  # the micro-batch's width


@pytest.mark.parametrize("reduction", ["token_mean", "fixed"])
def test_critic_first_gives_the_one_backward_gradients(tiny_dir, reduction):
    """One-update PPO with a separate critic on one process backwards the value loss before the
    policy's forward (`_critic_first`, to hold one model's activations at a time). Its two
    backwards give every parameter the gradient of the one backward of policy_loss + vf_coef *
    value_loss, and minibatch_loss logs the same losses."""
    from accelerate import Accelerator

    from posttrain.algos.ppo import _critic_first, minibatch_loss
    from posttrain.models import load_model
    from posttrain.online import take
    from posttrain.rollout import generate
    from posttrain.value_head import prepare_critic

    policy, tok = load_model(str(tiny_dir))
    critic = prepare_critic(load_model(str(tiny_dir))[0])
    with torch.no_grad():
        critic.model.norm.weight.mul_(1.5)  # the critic differs from the policy
    head = ValueHead(hidden_size(policy))
    torch.nn.init.normal_(head.summary.weight, std=0.1)
    ac = ActorCritic(policy, head, critic).eval()
    torch.manual_seed(0)
    prompts = ["hello", "The quick brown fox", "Paris", "This film is"]
    roll = generate(policy, tok, prompts, GenerationConfig(max_new_tokens=6, temperature=1.0))
    B = len(roll)
    mask = roll.policy_mask.float()
    adv = torch.randn(mask.shape) * mask
    returns = torch.randn(mask.shape) * mask
    cfg = Config(vf_coef=0.3, loss_reduction=reduction)
    acc = Accelerator(cpu=True)

    def grads() -> dict[str, torch.Tensor]:
        out = {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}
        ac.zero_grad(set_to_none=True)
        return out

    mb = take(roll, torch.arange(B), adv=adv, returns=returns, loss_mask=mask)
    loss, m1 = minibatch_loss(ac, mb, cfg, 0.7, normaliser=6)
    loss.backward()
    one = grads()
    values = ac.critic_values(mb.input_ids, mb.attention_mask, mb.T)
    outputs = _critic_first(acc, ac, mb, values, returns, mask, cfg, 0.7, 6)
    assert ac.critic.model.norm.weight.grad is not None  # the value loss went back already
    assert ac.policy.model.norm.weight.grad is None
    loss, m2 = minibatch_loss(ac, mb, cfg, 0.7, outputs, normaliser=6)
    loss.backward()
    two = grads()
    assert one.keys() == two.keys()
    assert any(n.startswith("critic.") for n in one) and any(n.startswith("policy.") for n in one)
    for n in one:
        assert torch.allclose(one[n], two[n], rtol=1e-5, atol=1e-7), n
    for k in m1:
        assert torch.allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7), k
