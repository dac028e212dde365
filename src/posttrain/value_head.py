"""The value function for PPO: a scalar head on a causal LM's last hidden states.

    ActorCritic(policy, ValueHead(H))            value head on the policy's own trunk
    ActorCritic(policy, ValueHead(H), critic)    a separate critic model with the head on its trunk

`ActorCritic.forward` runs one forward pass per model and returns the logits that predict each
completion token and the value of the state before that token, both (B, T): position t of the
sequence sees the prompt and completion[:t], predicts completion[t] and estimates the return from
there. The head reads the last layer's hidden states (after the final norm, the same vectors the LM
head reads), so with a shared trunk the value gradient also trains the policy's layers (or its LoRA
adapter), as in Ziegler et al. (2019) and TRL's `AutoModelForCausalLMWithValueHead`.

The head is saved as safetensors (`value_head.safetensors`, keys `summary.weight`,
`summary.bias`) next to the policy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """Linear(hidden, 1) in fp32. Zero-initialised, so every value starts at 0 and the first
    value-loss gradients come from the returns alone."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) hidden states -> (B, T) values."""
        return self.summary(hidden.float()).squeeze(-1)


def hidden_size(model: nn.Module) -> int:
    """The trunk width of a (possibly peft-wrapped) causal LM."""
    cfg = model.config
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if size is None:
        raise ValueError(f"cannot read the hidden size of a {type(model).__name__}")
    return int(size)


def _trunk_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int
):
    from posttrain.ops import position_ids_from_mask

    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=logits_to_keep,
        output_hidden_states=True,
        use_cache=False,
    )


def prepare_critic(model: nn.Module) -> nn.Module:
    """A separate critic reads only hidden states: freeze its LM head (unless it is tied to the
    input embeddings, which do get gradients), so that no trainable parameter is left without a
    gradient (DistributedDataParallel refuses those) and AdamW does not carry its state."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and (emb is None or head.weight is not emb.weight):
        head.requires_grad_(False)
    return model


class ActorCritic(nn.Module):
    """The policy and its value function as one module (one optimizer, one gradient clip, one
    `accelerate.prepare`). `policy` is a causal LM (or a peft model around one)."""

    def __init__(self, policy: nn.Module, value_head: ValueHead, critic: nn.Module | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.critic = critic

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n_completion: int,
        temperature: float = 1.0,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits (B, T, V) predicting the last T = n_completion tokens, values (B, T).

        groups (B,): rows with the same id share their prompt, which then runs through the policy
        once (`forwards.shared_prompt_forward`; the head on the policy's trunk only)."""
        if groups is not None and self.critic is None:
            from posttrain.forwards import shared_prompt_forward

            logits, hidden = shared_prompt_forward(
                self.policy, input_ids, attention_mask, n_completion, groups=groups,
                hidden_states=True,
            )  # fmt: skip
            if temperature != 1.0:
                logits = logits / temperature
            return logits, self.value_head(hidden)  # (B, T, V), (B, T)
        if self.critic is not None:
            return (
                self.policy_logits(input_ids, attention_mask, n_completion, temperature),
                self.critic_values(input_ids, attention_mask, n_completion),
            )
        out = _trunk_forward(self.policy, input_ids, attention_mask, n_completion + 1)
        logits = _completion_logits(out.logits, temperature)
        return logits, self._values(out.hidden_states[-1], n_completion)

    def policy_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        n_completion: int,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """The policy's half of `forward` with a separate critic: logits (B, T, V)."""
        out = _trunk_forward(self.policy, input_ids, attention_mask, n_completion + 1)
        return _completion_logits(out.logits, temperature)

    def critic_values(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_completion: int
    ) -> torch.Tensor:
        """The separate critic's half of `forward`: values (B, T). Run apart from the policy's
        half, its graph can be freed by a backward before the policy's forward (PPO's
        one-update step does that on one process: one model's activations at a time)."""
        if self.critic is None:
            raise ValueError("critic_values needs a separate critic (ppo --critic=separate)")
        # the critic's own logits are never used: keep one position
        hidden = _trunk_forward(self.critic, input_ids, attention_mask, 1).hidden_states[-1]
        return self._values(hidden, n_completion)

    def _values(self, hidden: torch.Tensor, n_completion: int) -> torch.Tensor:
        # the hidden state that predicts completion token t is the state before token t
        return self.value_head(hidden[:, -(n_completion + 1) : -1])  # (B, T)


def _completion_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, T + 1, V) logits of the last T + 1 positions -> (B, T, V): position t predicts
    completion token t (the last position predicts past the sequence), divided by temperature."""
    logits = logits[:, :-1]
    return logits / temperature if temperature != 1.0 else logits


def save_value_head(head: ValueHead, folder: str | Path) -> Path:
    """Write `folder/value_head.safetensors`."""
    from safetensors.torch import save_file

    path = Path(folder) / VALUE_HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def load_value_head(folder: str | Path, device: torch.device | str | None = None) -> ValueHead:
    """Read a head written by `save_value_head` (the hidden size comes from the weights)."""
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {VALUE_HEAD_FILE} in {str(folder)!r}")
    state = load_file(str(path))
    head = ValueHead(state["summary.weight"].shape[1])
    head.load_state_dict(state)
    return head.to(device) if device is not None else head
