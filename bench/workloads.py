"""The workloads that bench/trl_compare.py runs on both sides: data, reward, hyper-parameters.

Everything both libraries must agree on lives here, so a difference in the table is a difference in
the libraries and not in the inputs: the same unit-conversion rows rendered through the same chat
template, the same preference pairs, the same Python reward, the same optimizer settings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

# Shared by every workload (both sides): AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0,
# constant learning rate, no warm-up, clip grad norm 1.0, no gradient accumulation, seed 0, one log
# line per step, no evaluation and no checkpoint inside the timed steps.
COMMON = "AdamW wd 0, constant lr, clip 1.0, accum 1, log every step, no eval/ckpt"


@dataclass(frozen=True)
class Workload:
    name: str
    """row name in the table"""
    kind: str
    """sft | dpo | grpo | rloo | reinforce | ppo | generate"""
    trl: str
    """what runs on the TRL side (its trainer, or model.generate)"""
    lr: float = 1e-5
    """peak learning rate (both sides)"""
    lora: bool = False
    """LoRA r=16, alpha=32, dropout 0, all linear layers (both sides)"""
    batch: int = 8
    """SFT/DPO: examples (pairs) per step; online: completions per step"""
    group: int = 4
    """online: completions per prompt (prompts per step = batch / group)"""
    new_tokens: int = 32
    """online/generate: most new tokens per completion"""
    kl: float = 0.0
    """online: KL coefficient on the posttrain side (0: no reference model)"""
    trl_kl: float = 0.0
    """online: TRL's beta (0: no reference model)"""
    plain: bool = False
    """plain-text prompts (the question alone, no chat template, so no system prompt shared by
    every row) instead of chat-templated ones"""
    notes: str = ""
    """hyper-parameters and differences, printed next to the row"""
    trl_env: str = ""
    """the TRL side runs in this environment of TRL_ENVS instead of the harness's own ("": the
    TRL installed next to posttrain)"""
    extra: dict[str, Any] = field(default_factory=dict)


# TRL releases that the harness's TRL side needs and that cannot live next to posttrain's TRL:
# name -> (virtual environment under bench/, the TRL it holds, the command that builds it).
# PPOTrainer left TRL after 1.12 (trl.experimental.ppo there), so the ppo rows run 1.12.
TRL_ENVS: dict[str, tuple[str, str, str]] = {
    "trl112": (".venv-trl112", "1.12.0", "make bench-trl112-venv"),
}

WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "sft_lora",
            "sft",
            "SFTTrainer",
            lr=2e-4,
            lora=True,
            notes="LoRA r16 a32 all-linear, batch 8, max len {max_len}, completion-only loss, lr 2e-4",
        ),
        Workload(
            "sft_full",
            "sft",
            "SFTTrainer",
            lr=1e-5,
            notes="full weights, batch 8, max len {max_len}, completion-only loss, lr 1e-5",
        ),
        Workload(
            "dpo_full",
            "dpo",
            "DPOTrainer",
            lr=1e-6,
            notes="full, 8 pairs, prompt and completion <= {max_len} tok each (no truncation), beta 0.1 sigmoid, "
            "ref log-probs precomputed (both), lr 1e-6",
        ),
        Workload(
            "dpo_lora",
            "dpo",
            "DPOTrainer",
            lr=5e-5,
            lora=True,
            notes="LoRA r16, 8 pairs, prompt and completion <= {max_len} tok each (no truncation), beta 0.1 "
            "sigmoid, ref precomputed (both), lr 5e-5",
        ),
        Workload(
            "grpo",
            "grpo",
            "GRPOTrainer",
            lr=1e-6,
            kl=0.04,
            trl_kl=0.04,
            notes="full, 2 prompts x 4, 32 new tok, T=1, k3 KL 0.04 (ref copy), clip 0.2, seq-mean loss, 1 update/rollout, lr 1e-6",
        ),
        Workload(
            "rloo",
            "rloo",
            "RLOOTrainer",
            lr=1e-6,
            kl=0.05,
            trl_kl=0.05,
            notes="full, 2 prompts x 4, 32 new tok, T=1, k1 KL 0.05 in reward (ref copy), clip 0.2, 1 update/rollout, lr 1e-6",
        ),
        Workload(
            "reinforce",
            "reinforce",
            "RLOOTrainer",
            lr=1e-6,
            group=1,
            notes="posttrain REINFORCE 8 prompts x 1, moving-avg baseline, no KL vs TRL RLOO 2 x 4 beta 0 "
            "(TRL has no REINFORCE); 32 new tok, T=1, lr 1e-6",
        ),
        Workload(
            "reinforce_2x4",
            "reinforce",
            "RLOOTrainer",
            lr=1e-6,
            group=4,
            notes="posttrain REINFORCE 2 prompts x 4 (the prompts and completions of TRL's RLOO), moving-avg "
            "baseline, no KL vs TRL RLOO 2 x 4 beta 0 (TRL has no REINFORCE); 32 new tok, T=1, lr 1e-6",
        ),
        Workload(
            "ppo",
            "ppo",
            "PPOTrainer",
            lr=1e-6,
            group=1,
            kl=0.05,
            trl_kl=0.05,
            trl_env="trl112",
            notes="PPO vs TRL 1.12.0's PPOTrainer (trl.experimental.ppo, in bench/.venv-trl112): full, 8 "
            "prompts x 1, 32 new tok (stop at EOS), T=1, k1 KL 0.05 fixed in the reward (ref copy), GAE "
            "gamma 1 lam 0.95, whitened advantages, clip 0.2, value clip 0.2, vf 0.1, a separate value "
            "model (a copy of the policy + scalar head) and one reward model (SmolLM2 + scalar head, the "
            "same saved weights) on both sides, 1 epoch x 1 minibatch, no grad clip (TRL's PPO has "
            "none), lr 1e-6",
        ),
        Workload(
            "generate",
            "generate",
            "model.generate",
            group=4,
            notes="8 completions (2 prompts x 4), 32 new tok, T=1, KV cache; posttrain.rollout.generate vs "
            "transformers generate (TRL's sampler without vLLM)",
        ),
    ]
}

# The plain-prompt rows: the chat rows' settings on the question alone (no chat template, so no
# system prompt shared by every row).
for _base in ("sft_full", "dpo_full", "grpo", "rloo", "ppo"):
    WORKLOADS[f"{_base}_plain"] = replace(
        WORKLOADS[_base],
        name=f"{_base}_plain",
        plain=True,
        notes=f"{_base} on plain prompts (the question alone, no chat template or system prompt)",
    )

DEFAULT_WORKLOADS = [
    "sft_lora",
    "sft_full",
    "dpo_full",
    "dpo_lora",
    "grpo",
    "rloo",
    "sft_full_plain",
    "dpo_full_plain",
    "grpo_plain",
    "rloo_plain",
    "ppo",
    "ppo_plain",
]


# ---------------------------------------------------------------------------------------------
# Data: unit-conversion rows, rendered through the model's own chat template


def task_rows(n: int) -> list[dict[str, Any]]:
    """The first n training rows of the unit-conversion task (deterministic, offline)."""
    from posttrain.tasks import load_task
    from posttrain.tasks.base import TaskConfig

    rows = load_task(TaskConfig(name="unit_conversion")).rows("train")
    return [rows[i % len(rows)] for i in range(n)]


def plain_prompt(row: dict[str, Any]) -> str:
    """The question alone (the user message), as plain text ending in a newline."""
    return row["prompt"][-1]["content"] + "\n"


def prompt_text(tok: Any, row: dict[str, Any], plain: bool = False) -> str:
    """The chat-templated prompt (system + user, generation prompt open) as one string, or the
    plain question."""
    if plain:
        return plain_prompt(row)
    return tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)


def sft_rows(tok: Any, n: int, plain: bool = False) -> list[dict[str, str]]:
    """prompt/completion text pairs: the worked solution is the completion."""
    return [
        {"prompt": prompt_text(tok, r, plain), "completion": r["solution"]} for r in task_rows(n)
    ]


def _wrong(solution: str) -> str:
    """The solution with a wrong final answer (x 1.7), for the rejected side of a pair."""

    def swap(m: re.Match) -> str:
        try:
            return f"<answer>{float(m.group(1)) * 1.7:.6g}</answer>"
        except ValueError:
            return "<answer>0</answer>"

    out = re.sub(r"<answer>(.*?)</answer>", swap, solution)
    return out if out != solution else solution + " <answer>0</answer>"


def dpo_rows(tok: Any, n: int, plain: bool = False) -> list[dict[str, str]]:
    """prompt/chosen/rejected: the right worked solution against the same with a wrong answer."""
    return [
        {
            "prompt": prompt_text(tok, r, plain),
            "chosen": r["solution"],
            "rejected": _wrong(r["solution"]),
        }
        for r in task_rows(n)
    ]


def prompt_messages(n: int) -> list[list[dict[str, str]]]:
    """Chat prompts (system + user messages) for the online workloads."""
    return [r["prompt"] for r in task_rows(n)]


def plain_prompts(n: int) -> list[str]:
    """Plain-text prompts (the question alone) for the online workloads' plain rows."""
    return [plain_prompt(r) for r in task_rows(n)]


# ---------------------------------------------------------------------------------------------
# The reward: one Python function, called through each library's own reward interface


def format_score(text: str) -> float:
    """1.5 for a closed <answer></answer>, 0.5 for an opened one, minus 0.002 per character."""
    opened, closed = "<answer>" in text, "</answer>" in text
    return 1.0 * (opened and closed) + 0.5 * opened - 0.002 * len(text)


def posttrain_reward(prompts: list[str], completions: list[str], batch: Any) -> list[float]:
    """posttrain's python: reward signature (prompts, completions, batch) -> (B,) floats."""
    return [format_score(c) for c in completions]


def trl_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    """TRL's reward-function signature; conversational completions are lists of messages."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [format_score(t) for t in texts]
