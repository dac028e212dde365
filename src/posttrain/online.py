"""Pieces shared by the online RL commands (reinforce, rloo/grpo, ppo): generation settings,
prompts, the reference policy, micro-batches and their loss weights, the no-grad scoring pass.
The skeleton that uses them (setup, update, step end) is `posttrain.online_run`.

  GenOverrides / resolve_generation   the task's generation defaults, with [gen] keys that are set winning
  PromptStream                        train rows cycled in a seeded shuffle, resumable by a counter;
                                      `draw` also gives each prompt its sampling seed
  build_reference                     frozen copy, base weights with the LoRA adapter off, or none
  take -> MicroBatch                  some rollout rows as model inputs, padding trimmed
  micro_batches / accumulation_weight split a step into micro-batches whose summed loss is exact
  step_tokens                         a step's token count over all processes (token_mean normaliser)
  gather_rows / whiten_over_processes batch statistics over every process, as on one
  score_rollout -> Scores             no-grad pass: old_logp, ref_logp, entropy, exact KL, values (B, T)

Tools (`posttrain.tools`): a rollout's tool-inserted tokens are attended to (`completion_mask`,
the attention mask) but were not sampled by the policy, so every log-prob, loss, KL, entropy and
length here runs over `Rollout.policy_mask` (`take` returns it as `MicroBatch.mask`).

Names (docs/glossary.md): B rollout rows, b the rows of a micro-batch, T completion tokens (T' after
trimming), P prompt tokens, V the vocabulary; logp, old_logp, ref_logp, values, old_values,
returns, adv as everywhere."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from posttrain.config import ConfigError, check
from posttrain.forwards import completion_logits, completion_logits_shared
from posttrain.models import adapter_disabled, frozen_copy, is_peft
from posttrain.ops import (
    Reduction,
    entropy_from_logits,
    exact_kl,
    masked_whiten,
    selective_log_softmax,
)
from posttrain.rollout import GenerationConfig, Rollout
from posttrain.sampling import mix_seed
from posttrain.tasks.base import columns

# ---------------------------------------------------------------------------------------------
# Generation settings: task defaults, config wins


@dataclass
class GenOverrides:
    """Generation settings for training rollouts. Unset keys take the task's defaults
    (`task.generation()`); the number of samples per prompt is set by the algorithm."""

    max_new_tokens: int | None = check(None, ">= 1")
    """most tokens generated per completion (unset: the task's default)"""
    temperature: float | None = check(None, "> 0")
    """sampling temperature, > 0 (unset: the task's default); the loss uses the same temperature"""
    top_k: int | None = check(None, ">= 0")
    """keep the k most likely tokens, 0 = off (unset: the task's default)"""
    top_p: float | None = check(None, "in (0, 1]")
    """nucleus sampling, 1 = off (unset: the task's default)"""
    stop: list[str] | None = None
    """stop strings (unset: the task's default)"""
    chat: bool | None = None
    """apply the chat template to string prompts (unset: the task's default)"""
    system_prompt: str | None = None
    """system message for chat prompts (unset: the task's default)"""
    max_prompt_tokens: int | None = check(None, ">= 1")
    """prompts keep their last this many tokens (unset: the task's default)"""
    token_budget: int | None = check(None, ">= 1")
    """generation micro-batch limit in tokens (unset: the task's default)"""
    lean_decoder: bool | None = None
    """decode with posttrain's lean step (Llama-architecture models on a CPU; unset: on)"""
    continuous_batching: bool | None = None
    """lean decoder, more rows than one micro-batch: finished rows' slots take the next rows
    (unset: on)"""
    sample_dtype: Literal["model", "bfloat16"] | None = None
    """bfloat16: a bf16 copy of the policy samples; the policy rescores the samples and each
    token's advantage is weighted by min(pi / pi_bf16, sampler_weight_cap) (unset: model)"""
    sampler_weight_cap: float | None = check(None, "> 0")
    """cap on the importance weight of a token the bf16 copy sampled (unset: 2)"""


def resolve_generation(
    task_gen: GenerationConfig, over: GenOverrides, *, n: int
) -> GenerationConfig:
    """The task's GenerationConfig with every key set in `over` replaced, and n samples per prompt."""
    set_keys = {
        f.name: getattr(over, f.name)
        for f in dataclasses.fields(over)
        if getattr(over, f.name) is not None
    }
    gen = dataclasses.replace(task_gen, **set_keys, n=n)
    if gen.temperature <= 0:
        raise ConfigError(
            f"gen.temperature={gen.temperature}: online RL learns from sampled completions, so the "
            "temperature must be > 0 (set --gen.temperature=1.0)"
        )
    return gen


# ---------------------------------------------------------------------------------------------
# Prompts


class PromptStream:
    """Training rows in a seeded shuffle, reshuffled each epoch, cycled forever.

    Process `rank` of `world` takes every world-th row of the global order, so processes see
    different prompts. The position is one counter (`state_dict`), so resume continues exactly.
    `draw` also returns a sampling seed per row, from the run seed and the row's global position
    in the stream: a prompt samples the same completions whichever process draws it.
    """

    def __init__(self, rows: list[dict[str, Any]], seed: int, rank: int = 0, world: int = 1):
        if not rows:
            raise ConfigError("the task has no training rows (check [task] source and train_size)")
        self.rows = rows
        self.seed = seed
        self.rank = rank
        self.world = world
        self.drawn = 0
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.rows), generator=g).tolist()}
        return self._orders[epoch]

    def next(self, k: int) -> list[dict[str, Any]]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.drawn * self.world + self.rank, len(self.rows))
            out.append(self.rows[self._order(epoch)[i]])
            self.drawn += 1
        return out

    def draw(self, k: int) -> tuple[list[dict[str, Any]], list[int]]:
        """The next k rows and their sampling seeds (for `generate(..., seeds=)`)."""
        first = self.drawn
        seeds = [mix_seed(self.seed, (first + j) * self.world + self.rank) for j in range(k)]
        return self.next(k), seeds

    @property
    def epoch(self) -> float:
        return self.drawn * self.world / len(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = int(state["drawn"])


def rollout_batch(rows: list[dict[str, Any]], roll: Rollout) -> dict[str, list[Any]]:
    """Columnar task fields for every rollout row (a prompt's row repeated for its n samples)."""
    return columns([rows[i] for i in roll.prompt_index.tolist()])


# ---------------------------------------------------------------------------------------------
# Reference policy


class Reference:
    """The frozen reference policy: a copy of the initial weights ("copy") or the policy's own base
    weights with its LoRA adapter switched off ("adapter", no second copy in memory)."""

    def __init__(self, kind: str, policy: Any):
        self.kind = kind
        self.model = frozen_copy(policy) if kind == "copy" else policy

    @torch.no_grad()
    def logits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        n_completion: int,
        temperature: float,
        groups: Tensor | None = None,
    ) -> Tensor:
        """(B, T, V) reference logits for the last n_completion tokens; with groups (B,), rows of
        one group share their prompt and it runs once (`forwards.completion_logits_shared`)."""
        ctx = adapter_disabled(self.model) if self.kind == "adapter" else contextlib.nullcontext()
        with ctx:
            return _logits(self.model, input_ids, attention_mask, n_completion, temperature, groups)


def _logits(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    n_completion: int,
    temperature: float,
    groups: Tensor | None,
) -> Tensor:
    """completion_logits, or completion_logits_shared when groups are given."""
    if groups is None:
        return completion_logits(model, input_ids, attention_mask, n_completion, temperature)
    return completion_logits_shared(
        model, input_ids, attention_mask, n_completion, temperature, groups=groups
    )


def build_reference(
    kind: str, policy: Any, kl_coef: float, *, adapter: str | None = None
) -> Reference | None:
    """kind: auto (none when kl_coef is 0, else adapter under a fresh LoRA adapter, else copy),
    copy, adapter, none. adapter: the saved adapter the policy was loaded with
    (`--model.adapter`, e.g. an SFT run's): the run starts from base + that adapter, so auto
    takes a frozen copy of it ("adapter" would switch it off and pull toward the model before SFT).

    Call it before loading a checkpoint, so that "copy" holds the initial weights.
    """
    if kind == "auto":
        fresh_lora = is_peft(policy) and not adapter
        kind = "none" if kl_coef == 0 else ("adapter" if fresh_lora else "copy")
    if kind == "none":
        if kl_coef:
            raise ConfigError(f"kl_coef={kl_coef} needs a reference policy; set ref=auto or copy")
        return None
    if kind == "adapter" and not is_peft(policy):
        raise ConfigError("ref=adapter needs a LoRA policy (lora.enabled=true); use ref=copy")
    if kind not in ("copy", "adapter"):
        raise ConfigError(f"ref={kind!r}: use auto, copy, adapter or none")
    return Reference(kind, policy)


# ---------------------------------------------------------------------------------------------
# Micro-batches


def micro_batches(n_rows: int, n_micro: int, order: Tensor | None = None) -> list[Tensor]:
    """Row indices split into n_micro nearly equal chunks (in `order` if given)."""
    idx = torch.arange(n_rows) if order is None else order
    n_micro = max(1, min(n_micro, n_rows))
    return [c for c in torch.tensor_split(idx, n_micro) if len(c)]


@dataclass
class MicroBatch:
    """Some rollout rows as model inputs (`take`): b rows, the completion trimmed to T' tokens
    (its longest row's), the prompt to P' (columns that are padding in every row dropped).
    The per-row tensors are None when the caller did not pass them."""

    input_ids: Tensor
    """(b, P' + T') prompt then completion tokens"""
    attention_mask: Tensor
    """(b, P' + T') 1 on real tokens: prompt, sampled and tool-inserted completion tokens"""
    mask: Tensor
    """(b, T') the policy mask: the completion tokens the policy sampled (tool tokens 0)"""
    T: int
    """T', the completion width"""
    groups: Tensor
    """(b,) the prompt of each row (`Rollout.prompt_index`): rows of one prompt share its forward"""
    adv: Tensor | None = None
    """(b,) per sequence or (b, T') per token"""
    old_logp: Tensor | None = None
    """(b, T') log-probs of the sampled tokens under the policy that sampled them"""
    ref_logp: Tensor | None = None
    """(b, T') the same under the reference policy"""
    old_values: Tensor | None = None
    """(b, T') PPO: the values at sampling time (the value clip's centre)"""
    returns: Tensor | None = None
    """(b, T') PPO: the value targets"""
    loss_mask: Tensor | None = None
    """(b, T') the mask of the loss: `mask` with skipped rows (invalid rewards) zeroed"""

    @property
    def completion_ids(self) -> Tensor:
        """(b, T') the completion tokens, the targets of logp"""
        return self.input_ids[:, -self.T :]


def take(
    roll: Rollout,
    rows: Tensor,
    *,
    adv: Tensor | None = None,
    old_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    old_values: Tensor | None = None,
    returns: Tensor | None = None,
    loss_mask: Tensor | None = None,
) -> MicroBatch:
    """The tensors of some rollout rows, completion padding trimmed to the longest row.

    The per-row tensors are (B, T) (or adv (B,)) over the whole rollout, sliced to the rows and
    to T' columns. The attention mask and the width T' come from the completion mask
    (tool-inserted tokens are read by the model); `mask` is the policy mask
    (`Rollout.policy_mask`: tool tokens are 0), the mask of every loss.
    """
    rows = rows.to(roll.completion_mask.device)
    attn = roll.completion_mask[rows]  # (b, T) every completion token, tool results included
    T = max(1, int(attn.sum(1).max()))
    # prompt columns that are padding in every row (prompts are left-padded to the rollout's
    # longest) are dropped: positions come from the attention mask, so nothing else changes
    first = int(roll.prompt_mask[rows].any(0).long().argmax())

    def cut(v: Tensor | None) -> Tensor | None:
        if v is None:
            return None
        v = v[rows.to(v.device)]
        return v[:, :T] if v.dim() == 2 else v

    return MicroBatch(
        input_ids=torch.cat([roll.prompt_ids[rows, first:], roll.completion_ids[rows, :T]], 1),
        attention_mask=torch.cat([roll.prompt_mask[rows, first:], attn[:, :T].long()], 1),
        mask=roll.policy_mask[rows][:, :T],
        T=T,
        groups=roll.prompt_index[rows.to(roll.prompt_index.device)],
        adv=cut(adv),
        old_logp=cut(old_logp),
        ref_logp=cut(ref_logp),
        old_values=cut(old_values),
        returns=cut(returns),
        loss_mask=cut(loss_mask),
    )


def accumulation_weight(
    mask: Tensor, reduction: Reduction | str, *, step_rows: int, step_tokens: float
) -> float:
    """Factor for a micro-batch's reduced loss so that the micro-batch losses of one optimizer step
    sum to the loss of the whole step: token_mean -> tokens_mb / tokens_step; seq_mean, fixed and
    per-sequence sums -> rows_mb / rows_step."""
    if reduction == "token_mean":
        return float(mask.sum()) / max(float(step_tokens), 1.0)
    return mask.shape[0] / step_rows


def step_tokens(acc: Any, mask: Tensor) -> float:
    """The loss tokens of one optimizer step summed over processes, divided by the process count
    (DDP averages the processes' gradients): with it as `accumulation_weight`'s step_tokens, the
    token mean is over the step's tokens on every process, as on one process with the whole batch.
    A collective: every process must call it."""
    n = mask.sum().float()
    if acc.num_processes > 1:
        n = acc.reduce(n, reduction="sum") / acc.num_processes
    return float(n)


def gather_rows(acc: Any, x: Tensor) -> Tensor:
    """(B, ...) on each process -> (N x B, ...): every process's rows, for a batch statistic
    (a baseline) that must be the same as on one process with the whole batch. A collective."""
    return acc.gather(x) if acc.num_processes > 1 else x


def whiten_over_processes(acc: Any, x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """`ops.masked_whiten` with the mean and the (unbiased) variance over every process's masked
    entries, as one process with the whole batch computes them. x, mask (B, T). A collective."""
    if acc.num_processes == 1:
        return masked_whiten(x, mask, eps=eps)
    n = acc.reduce(mask.sum().float(), reduction="sum")
    mean = acc.reduce((x * mask).sum(), reduction="sum") / n.clamp(min=1)
    var = acc.reduce(((x - mean) ** 2 * mask).sum(), reduction="sum") / n.clamp(min=1)
    var = var * n / (n - 1) if n > 1 else var
    return (x - mean) * torch.rsqrt(var + eps) * mask


def no_sync_unless(acc: Any, model: Any, last: bool) -> Any:
    """Skip DDP's gradient all-reduce on every micro-batch of an optimizer step but the last."""
    return contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model)


# ---------------------------------------------------------------------------------------------
# The no-grad scoring pass


@dataclass
class Scores:
    """What the scoring pass gives before any update, all (B, T) on the rollout's full width,
    zero on padding and on tool-inserted tokens. None: not computed (see `score_rollout`)."""

    old_logp: Tensor
    """log-probs of the sampled tokens under the policy that sampled them"""
    ref_logp: Tensor | None = None
    """the same under the reference policy (None without one)"""
    entropy: Tensor | None = None
    """the policy's token entropy"""
    kl_exact: Tensor | None = None
    """KL(policy || reference) over the whole vocabulary"""
    values: Tensor | None = None
    """PPO: the value of the state before each token"""
    sampler_weight: Tensor | None = None
    """min(pi / pi_sampler, cap) per token when a lower-precision copy sampled the rollout
    (`gen.sample_dtype`; None when the policy itself sampled): `sampler_weighted`"""


Forward = Callable[..., tuple[Tensor, Tensor | None]]
"""(input_ids, attention_mask, T, temperature, groups) -> (logits (B, T, V), values (B, T) | None)"""


def policy_forward(model: Any) -> Forward:
    """A causal LM as a `Forward` without values; `value_head.ActorCritic` is one with values."""
    return lambda *args: (_logits(model, *args), None)


@torch.no_grad()
def score_rollout(
    model: Any,
    ref: Reference | None,
    roll: Rollout,
    *,
    temperature: float,
    n_micro: int,
    on_policy: bool = False,
    exact: bool = True,
    share_prompts: bool = True,
    forward: Forward | None = None,
    sampler_weight_cap: float = 2.0,
) -> Scores:
    """Before any update: old_logp, entropy, (with a reference) ref_logp and the exact KL over the
    vocabulary, and (with a forward that gives them, PPO's actor-critic) the values.

    A rollout sampled by a lower-precision copy of the policy (`roll.exact_logp` False) always
    gets the policy's own forward, so old_logp, the KL and the ratio are the policy's, and
    `Scores.sampler_weight` = min(exp(old_logp - roll.logp), sampler_weight_cap): the truncated
    importance weight that corrects for sampling from the copy (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training").

    on_policy=True skips the policy's forward, for one update per rollout, where the policy being
    updated is the one that sampled: old_logp is then the sampler's (`rollout.logp`, the same
    quantity); entropy, values and the exact KL are None (the caller's training forward gives
    them). exact=False skips the KL over the vocabulary: two (B, T, V) softmaxes.
    share_prompts: rows of one prompt run it through each model once (`completion_logits_shared`).
    forward: the policy's forward (default: `policy_forward(model)`).
    """
    B, T = roll.completion_mask.shape
    dev = roll.completion_mask.device
    zeros = lambda: torch.zeros(B, T, device=dev)  # noqa: E731
    forward = forward or policy_forward(model)
    on_policy = on_policy and roll.exact_logp
    s = Scores(old_logp=roll.logp * roll.policy_mask)
    if not on_policy:
        s.old_logp, s.entropy, s.values = zeros(), zeros(), zeros()
        s.kl_exact = zeros() if exact and ref is not None else None
    if ref is not None:
        s.ref_logp = zeros()
    got_values = False
    with eval_mode(model):  # dropout off: the log-probs of the policy that sampled (issue #16)
        for rows in micro_batches(B, n_micro):
            mb = take(roll, rows)
            t, m, ids = mb.T, mb.mask, mb.completion_ids
            groups = mb.groups if share_prompts else None
            args = (mb.input_ids, mb.attention_mask, t, temperature, groups)
            if not on_policy:
                logits, values = forward(*args)
                s.old_logp[rows, :t] = selective_log_softmax(logits, ids) * m
                s.entropy[rows, :t] = entropy_from_logits(logits) * m
                if values is not None:
                    s.values[rows, :t] = values.float() * m
                    got_values = True
            if ref is not None:
                ref_logits = ref.logits(*args)
                s.ref_logp[rows, :t] = selective_log_softmax(ref_logits, ids) * m
                if s.kl_exact is not None:
                    s.kl_exact[rows, :t] = exact_kl(logits, ref_logits) * m
    if not got_values:
        s.values = None
    if not roll.exact_logp:
        mask = roll.policy_mask
        w = torch.exp(s.old_logp - roll.logp * mask).clamp(max=sampler_weight_cap)
        s.sampler_weight = w * mask
    return s


def sampler_weighted(adv: Tensor, scores: Scores) -> Tensor:
    """Advantages (B,) or (B, T) times each token's `Scores.sampler_weight` -> (B, T); unchanged
    when the policy itself sampled. A weight w >= 0 per token commutes with the clipped
    surrogate's min (min(r wA, clip(r) wA) = w min(rA, clip(r)A)) and scales REINFORCE's term, so
    weighting the advantage is the importance correction for every policy-gradient loss here."""
    if scores.sampler_weight is None:
        return adv
    return (adv[:, None] if adv.dim() == 1 else adv) * scores.sampler_weight


@contextlib.contextmanager
def eval_mode(model: Any) -> Any:
    """The model in eval mode (dropout off) inside the block, its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
