"""Pure tensor helpers shared by the algorithms.

Glossary (used in every file): B batch rows, T completion tokens, P prompt tokens, V vocabulary.
  logp      (B, T) log-prob of each completion token under the current policy
  old_logp  (B, T) the same under the policy that sampled it
  ref_logp  (B, T) the same under the reference policy
  mask      (B, T) 1.0 on real completion tokens, 0.0 on padding
  adv       (B, T) or (B,) advantages; rewards (B,); values/returns (B, T)
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

Reduction = Literal["token_mean", "seq_mean", "fixed"]


def selective_log_softmax(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full (B, T, V) log-softmax.

    logits (B, T, V), ids (B, T) -> (B, T). Computed in fp32 for stability.
    """
    logits = logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) along the last dim: (B, T, V) -> (B, T)."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - logz)
    return logz.squeeze(-1) - (p * logits).sum(-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: (B, L) mask -> (B, L) positions starting at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits that predict the last `n_completion` tokens of `input_ids`: (B, n_completion, V).

    Only those positions go through the output head (`logits_to_keep`), which saves a
    (B, P, V) matmul and its memory when prompts are long.
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n_completion + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # (B, T, V): position t predicts token t + 1
    if temperature != 1.0:
        logits = logits / temperature
    return logits


def completion_logits_shared(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
    *,
    groups: torch.Tensor,
) -> torch.Tensor:
    """`completion_logits` with every distinct prompt run through the model once.

    Rows with the same `groups` id (B,) share their prompt: the first P = L - n_completion columns
    of input_ids and attention_mask are equal. The prompts go through the model once per group
    (with the KV cache on), the cache is indexed back to one entry per row (a differentiable
    gather, so gradients reach the prompt positions as in the plain pass), and only the completion
    tokens run per row: a GRPO batch of k samples per prompt costs G x P + B x T tokens instead of
    B x (P + T). Same maths as `completion_logits` (up to float reassociation); the prompt's last
    position predicts completion token 0. Returns (B, n_completion, V).
    """
    logits, _ = shared_prompt_forward(model, input_ids, attention_mask, n_completion, groups=groups)
    if temperature != 1.0:
        logits = logits / temperature
    return logits


MIN_SHARED_PREFIX = 8
"""a common start of the prompts shorter than this is not worth a pass of its own"""


def common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """How many tokens every row's prompt starts with, at most its shortest length - 1 (each row
    keeps a token of its own). ids, mask (G, P) left-padded."""
    P = ids.shape[1]
    lengths = mask.sum(1)  # (G,)
    n = int(lengths.min()) - 1
    if n <= 0:
        return 0
    cols = (P - lengths)[:, None] + torch.arange(n, device=ids.device)[None]  # (G, n)
    toks = ids.gather(1, cols)  # each row's first n real tokens
    same = (toks == toks[:1]).all(0)  # (n,)
    return n if bool(same.all()) else int(same.long().argmin())


def prompt_pass(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    hidden_states: bool = False,
) -> tuple[Any, torch.Tensor]:
    """The prompts (G, P), left-padded, through the model with the cache on -> (output at the
    last position, the attention mask (G, K) of the K cached positions).

    When the prompts start with the same c >= MIN_SHARED_PREFIX tokens (a shared system prompt),
    that start runs once and its cache is repeated to the G rows; each row's remaining S tokens
    follow, left-padded, at positions c, c + 1, ... (the cache then holds c + S positions)."""
    G, P = ids.shape
    c = common_prefix(ids, mask) if G > 1 else 0
    if c < MIN_SHARED_PREFIX:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                    logits_to_keep=1, output_hidden_states=hidden_states, use_cache=True)  # fmt: skip
        return out, mask
    lengths = mask.sum(1)
    start = P - int(lengths[0])
    pre = model(
        input_ids=ids[:1, start : start + c],
        position_ids=torch.arange(c, device=ids.device)[None],
        logits_to_keep=1,
        use_cache=True,
    )
    cache = pre.cache
    cache.batch_select_indices(torch.zeros(G, dtype=torch.long, device=ids.device))
    S = int((lengths - c).max())
    own = (
        torch.arange(S, device=ids.device)[None] >= (S - (lengths - c))[:, None]
    ).long()  # (G, S)
    full = torch.cat([torch.ones(G, c, dtype=mask.dtype, device=mask.device), own], dim=1)
    out = model(
        input_ids=ids[:, P - S :],  # columns outside a row's own tokens are masked out
        attention_mask=full,
        position_ids=position_ids_from_mask(full)[:, c:],
        cache=cache,
        logits_to_keep=1,
        output_hidden_states=hidden_states,
        use_cache=True,
    )
    return out, full


def shared_prompt_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    *,
    groups: torch.Tensor,
    hidden_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward of `completion_logits_shared` (temperature 1) -> logits (B, T, V) predicting
    the last T = n_completion tokens and, with hidden_states, the last layer's hidden states
    (B, T, H) at the same positions (the state before each completion token; None otherwise).

    Two levels of sharing: each group's prompt runs once, and a start common to all prompts (the
    chat template's system prompt) runs once for all of them (`prompt_pass`)."""
    B, L = input_ids.shape
    P, T = L - n_completion, n_completion
    uniq, inv = torch.unique(groups, return_inverse=True)  # inv (B,): row -> its group
    inv = inv.to(input_ids.device)
    first = torch.zeros(len(uniq), dtype=torch.long, device=input_ids.device)
    first.scatter_(0, inv, torch.arange(B, device=input_ids.device))  # a row of each group
    inner = getattr(model, "module", model)  # under DDP
    shared = len(uniq) < B or (
        P > 0
        and common_prefix(input_ids[first, :P], attention_mask[first, :P]) >= MIN_SHARED_PREFIX
    )
    # the plain pass when nothing is shared, or when the model keeps no cache (activation
    # checkpointing turns it off)
    if not shared or P == 0 or getattr(inner, "is_activation_checkpointing", False):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            logits_to_keep=T + 1,
            output_hidden_states=hidden_states,
            use_cache=False,
        )
        hidden = out.hidden_states[-1][:, -(T + 1) : -1] if hidden_states else None
        return out.logits[:, :-1], hidden
    out, p_mask = prompt_pass(model, input_ids[first, :P], attention_mask[first, :P], hidden_states)
    logits = out.logits[:, -1:][inv]  # (B, 1, V): predicts completion token 0
    hidden = out.hidden_states[-1][:, -1:][inv] if hidden_states else None  # (B, 1, H)
    if T > 1:
        cache = out.cache
        cache.batch_select_indices(inv)  # (G, ...) -> (B, ...)
        # the cached prompt positions, then the completion but its last token (it predicts
        # nothing we need)
        mask = torch.cat([p_mask[inv], attention_mask[:, P : L - 1]], dim=1)
        rest = model(
            input_ids=input_ids[:, P : L - 1],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask)[:, -(T - 1) :],
            cache=cache,
            output_hidden_states=hidden_states,
            use_cache=True,
        )  # (B, T - 1, V)
        logits = torch.cat([logits, rest.logits], dim=1)
        if hidden_states:
            hidden = torch.cat([hidden, rest.hidden_states[-1]], dim=1)
    return logits, hidden


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs (B, T) of the last T = n_completion tokens of `input_ids`."""
    logits = completion_logits(model, input_ids, attention_mask, n_completion, temperature)
    return selective_log_softmax(logits, input_ids[:, -n_completion:])


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 where the mask is empty)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over masked positions; with shift_mean=False the mean is added back."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def aggregate_loss(
    loss_tok: torch.Tensor,
    mask: torch.Tensor,
    reduction: Reduction,
    normaliser: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar, by name.

    token_mean: sum over all tokens / number of tokens in the batch (DAPO, Dr. GRPO style).
    seq_mean:   mean over tokens within each sequence, then mean over sequences (original GRPO).
    fixed:      sum over all tokens / (B * normaliser), a constant that does not depend on lengths
                (Dr. GRPO); normaliser defaults to T.
    With gradient accumulation, only "fixed" and "seq_mean" (with equal micro-batch sizes) give the
    same gradient as one big batch; "token_mean" weights micro-batches by their token counts.
    """
    if reduction == "token_mean":
        return masked_sum(loss_tok, mask) / mask.sum().clamp(min=1)
    if reduction == "seq_mean":
        return masked_mean(loss_tok, mask, dim=1).mean()
    if reduction == "fixed":
        norm = normaliser if normaliser is not None else loss_tok.shape[1]
        return masked_sum(loss_tok, mask) / (loss_tok.shape[0] * norm)
    raise ValueError(f"unknown loss reduction {reduction!r}; use token_mean, seq_mean or fixed")


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k1 estimator of KL(pi || ref): log pi - log ref (unbiased, can be negative)."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator (Schulman): exp(ref - logp) - (ref - logp) - 1 >= 0, unbiased."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the vocabulary: (B, T, V) -> (B, T)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    lq = F.log_softmax(ref_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
