"""Model forwards that give the logits (and hidden states) of completion tokens, with the prompt of
a group of samples run once and its KV cache shared (`completion_logits_shared`). The pure maths
on their outputs is in `posttrain.ops`.

Shapes: B rows, P prompt tokens (left-padded), T completion tokens, V vocabulary, H hidden size.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from posttrain.ops import position_ids_from_mask, selective_log_softmax


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


def common_prefix(ids: torch.Tensor, mask: torch.Tensor, ref: torch.Tensor | None = None) -> int:
    """How many tokens every row's prompt starts with, at most its shortest length - 1 (each row
    keeps a token of its own). ids, mask (G, P) left-padded. ref (c,): count the tokens every row
    shares with ref instead (at most c)."""
    P = ids.shape[1]
    lengths = mask.sum(1)  # (G,)
    n = int(lengths.min()) - 1
    if ref is not None:
        n = min(n, len(ref))
    if n <= 0:
        return 0
    cols = (P - lengths)[:, None] + torch.arange(n, device=ids.device)[None]  # (G, n)
    toks = ids.gather(1, cols)  # each row's first n real tokens
    first = toks[:1] if ref is None else ref[:n].to(ids.device)[None]
    same = (toks == first).all(0)  # (n,)
    return n if bool(same.all()) else int(same.long().argmin())


class SharedStart:
    """A start common to the prompts (the chat template's system prompt) and its KV cache, kept
    from one `prompt_pass` for the later ones of the same call (`rollout.generate`: micro-batches
    and continuous-batching refills), which then skip its forward. Valid while the weights stay
    the same: one per generate call."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None  # (c,) the kept start's tokens
        self.cache: Any = None  # the model's cache of those c positions, one row

    def keep(self, ids: torch.Tensor, cache: Any) -> None:
        """Keep ids (c,) and a copy of their one-row cache (the caller goes on changing its own)."""
        self.ids, self.cache = ids.clone(), copy.deepcopy(cache)

    def match(self, ids: torch.Tensor, mask: torch.Tensor) -> int:
        """How many of the kept tokens every row of ids, mask (G, P) (left-padded) starts with,
        at most each row's length - 1 (a row keeps a token of its own)."""
        return 0 if self.ids is None else common_prefix(ids, mask, ref=self.ids)

    def take(self, c: int, G: int) -> Any:
        """A new cache of the kept start's first c positions, repeated to G rows."""
        cache = copy.deepcopy(self.cache)
        if c < len(self.ids):
            cache.crop(c - len(self.ids))  # crop takes the number of positions to drop, negated
        cache.batch_select_indices(torch.zeros(G, dtype=torch.long, device=self.ids.device))
        return cache


def prompt_pass(
    model: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    hidden_states: bool = False,
    start: SharedStart | None = None,
) -> tuple[Any, torch.Tensor]:
    """The prompts (G, P), left-padded, through the model with the cache on -> (output at the
    last position, the attention mask (G, K) of the K cached positions).

    When the prompts start with the same c >= MIN_SHARED_PREFIX tokens (a shared system prompt),
    that start runs once and its cache is repeated to the G rows; each row's remaining S tokens
    follow, left-padded, at positions c, c + 1, ... (the cache then holds c + S positions).
    With `start` (no gradients), a start kept by an earlier call is reused without a forward
    when the rows begin with at least MIN_SHARED_PREFIX of its tokens, and the first start run
    here is kept for the calls after."""
    G, P = ids.shape
    lengths = mask.sum(1)
    c, cache = 0, None
    if start is not None:
        c = start.match(ids, mask)
        cache = start.take(c, G) if c >= MIN_SHARED_PREFIX else None
    if cache is None:
        c = common_prefix(ids, mask) if G > 1 else 0
        if c < MIN_SHARED_PREFIX:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        logits_to_keep=1, output_hidden_states=hidden_states, use_cache=True)  # fmt: skip
            return out, mask
        first = P - int(lengths[0])
        pre = model(
            input_ids=ids[:1, first : first + c],
            position_ids=torch.arange(c, device=ids.device)[None],
            logits_to_keep=1,
            use_cache=True,
        )
        cache = pre.cache
        if start is not None and start.ids is None:
            start.keep(ids[0, first : first + c], cache)
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
