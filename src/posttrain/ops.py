"""Pure tensor maths shared by the algorithms: no model inside (the forwards that run a model
and edit its KV cache are in `posttrain.forwards`).

Glossary (used in every file): B batch rows, T completion tokens, P prompt tokens, V vocabulary.
  logp      (B, T) log-prob of each completion token under the current policy
  old_logp  (B, T) the same under the policy that sampled it
  ref_logp  (B, T) the same under the reference policy
  mask      (B, T) 1.0 on real completion tokens, 0.0 on padding
  adv       (B, T) or (B,) advantages; rewards (B,); values/returns (B, T)
"""

from __future__ import annotations

from typing import Literal

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


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}
"""per-token estimators of KL(pi || ref) by name, for every `kl_estimator` setting"""


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the vocabulary: (B, T, V) -> (B, T)."""
    lp = F.log_softmax(logits.float(), dim=-1)
    lq = F.log_softmax(ref_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    clip_range_high: float | None = None,
    reduction: Reduction = "token_mean",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate as a loss to minimise (PPO, GRPO, RLOO).

    logp, old_logp, mask (B, T); adv (B, T), or (B,) per sequence. old_logp and adv are constants.
      ratio  = exp(logp - old_logp)
      loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)      eps_high: DAPO's
      loss   = aggregate_loss(loss_t, mask, reduction, normaliser)            clip-higher
    with eps = clip_range and eps_high = clip_range_high (None: clip_range).
    Metrics: clip_fraction, the share of tokens where the clipped term is the smaller one, so
    their gradient is 0 (ratio > 1 + eps_high with A > 0, or ratio < 1 - eps with A < 0);
    ratio, its mean; approx_kl, the k3 estimate of KL(old || new), mean((ratio - 1) - log ratio).
    """
    adv = adv.detach()
    if adv.dim() == 1:
        adv = adv[:, None]  # (B, 1)
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip_range, 1 + high) * adv
    loss = aggregate_loss(-torch.minimum(unclipped, clipped), mask, reduction, normaliser)
    metrics = {
        "clip_fraction": masked_mean((clipped < unclipped).float(), mask),
        "ratio": masked_mean(ratio, mask),
        "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked tokens: 1 is a perfect critic, 0 is
    no better than predicting the mean, below 0 is worse."""
    return 1 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def __getattr__(name: str):  # noqa: ANN202
    """`prompt_pass` moved to `posttrain.forwards`; rollout.py (another owner's file) still
    imports it from here."""
    if name == "prompt_pass":
        from posttrain.forwards import prompt_pass

        return prompt_pass
    raise AttributeError(f"module 'posttrain.ops' has no attribute {name!r}")
