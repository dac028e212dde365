"""Advantages and baselines for online RL: pure tensor functions (plus one small stateful baseline).

Shapes: B rows, T completion tokens. Sequence-level functions take `rewards` (B,); when several
samples are drawn per prompt, the rows of one prompt are contiguous (rows g*k .. g*k+k-1 form group
g), which is how `rollout.generate` returns them.

  batch_mean_baseline(rewards)                 b = mean(rewards)                        REINFORCE
  MovingAverageBaseline(decay)                 b_t = decay * b_{t-1} + (1 - decay) * mean(r_t)
  rloo_advantages(rewards, k)                  A_i = r_i - mean_{j != i} r_j            RLOO
  group_normalized_advantages(rewards, k)      A_i = (r_i - mean_g) / (std_g + eps)     GRPO
  gae(rewards, values, mask, gamma, lam)       GAE(gamma, lambda) and returns, over the  PPO
                                               masked positions (tool tokens skipped)
  whiten(x, mask)                              (x - mean) / std

Rows a reward marked invalid (`valid`/`mask` False) take no part in a group's statistics and get
advantage 0, so they add nothing to the loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from posttrain.ops import masked_whiten


def batch_mean_baseline(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """The mean reward of the batch (over valid rows), as a scalar tensor (). rewards (B,)."""
    if valid is None:
        return rewards.mean()
    v = valid.to(rewards.dtype)
    return (rewards * v).sum() / v.sum().clamp(min=1)


class MovingAverageBaseline:
    """An exponential moving average of past mean rewards: b_t = decay*b_{t-1} + (1-decay)*mean(r_t).

    `baseline = ma(rewards)` returns the average of the *previous* batches (so the baseline does not
    depend on the current samples and the gradient stays unbiased), then folds this batch in. The
    first call has no history and returns the batch's own mean. `state_dict` / `load_state_dict`
    carry it across a resume.
    """

    def __init__(self, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"moving-average decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.value: float | None = None

    def __call__(self, rewards: Tensor, valid: Tensor | None = None) -> Tensor:
        mean = batch_mean_baseline(rewards, valid)  # ()
        b = mean if self.value is None else torch.tensor(self.value, dtype=rewards.dtype)
        self.update(float(mean))
        return b.to(rewards.device)

    def update(self, batch_mean: float) -> None:
        if self.value is None:
            self.value = batch_mean
        else:
            self.value = self.decay * self.value + (1.0 - self.decay) * batch_mean

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.value = None if state["value"] is None else float(state["value"])


def _groups(x: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B // k, k), checking that B is a multiple of k."""
    if group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"{x.shape[0]} rows do not split into groups of {group_size}")
    return x.reshape(-1, group_size)


def rloo_advantages(rewards: Tensor, group_size: int, *, valid: Tensor | None = None) -> Tensor:
    """Leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): (B,) -> (B,).

    A_i = r_i - (sum_{j in g, j != i} r_j) / (k - 1), for k = group_size >= 2 samples of a prompt.
    With `valid` (B,) bool, the mean runs over the valid other rows; invalid rows and rows with no
    valid neighbour get 0.
    """
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt (group_size >= 2)")
    v = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)
    r = _groups(rewards * v, group_size)  # (G, k)
    m = _groups(v, group_size)  # (G, k)
    others = (r.sum(1, keepdim=True) - r) / (m.sum(1, keepdim=True) - m).clamp(min=1)
    has_other = (m.sum(1, keepdim=True) - m) > 0
    adv = torch.where(has_other & (m > 0), r - others, torch.zeros_like(r))
    return adv.reshape(-1)


def group_normalized_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    scale: bool = True,
    eps: float = 1e-4,
    valid: Tensor | None = None,
) -> Tensor:
    """GRPO advantages (Shao et al. 2024): (B,) -> (B,).

    A_i = (r_i - mean_g) / (std_g + eps) with the mean and the sample standard deviation (n - 1 in
    the denominator, as torch.std) over the k = group_size rows of prompt g. scale=False keeps only
    the centring (Dr. GRPO, Liu et al. 2025). A group whose rewards are all equal gets 0. With
    `valid`, statistics run over valid rows only and invalid rows get 0.
    """
    v = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)
    r = _groups(rewards * v, group_size)  # (G, k)
    m = _groups(v, group_size)  # (G, k)
    n = m.sum(1, keepdim=True)
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)
    adv = (r - mean) * m
    if scale:
        var = (adv**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return adv.reshape(-1)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked positions (actions).

    rewards, values, mask: (B, T). With t' the next masked-in position after t (none: the episode
    ends, V = A = 0 there):
      delta_t = r_t + gamma * V_t' - V_t
      A_t     = delta_t + gamma * lam * A_t'
      returns = A_t + V_t
    Masked-out positions are skipped, not episode ends: right padding, and tokens a tool inserted
    inside a completion (the environment's answer, not the policy's action: the action before a
    tool result bootstraps from the value of the action after it, and gamma and lam count actions).
    Their rewards are ignored. Returns (adv, returns), both (B, T), zero at masked positions; for
    right-padded masks with no holes this is the usual recursion.
    """
    mask = mask.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(values)
    next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        act = mask[:, t] > 0  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * mask[:, t]
        next_adv = torch.where(act, a, next_adv)  # a masked position passes both through
        next_value = torch.where(act, values[:, t], next_value)
    returns = (adv + values) * mask
    return adv, returns


def whiten(x: Tensor, mask: Tensor | None = None, *, shift_mean: bool = True) -> Tensor:
    """(x - mean) / std over the masked entries (all entries when mask is None)."""
    if mask is None:
        mask = torch.ones_like(x)
    return masked_whiten(x, mask.to(x.dtype), shift_mean=shift_mean)
