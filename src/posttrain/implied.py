"""What a run's config implies: prompts, samples and tokens per step, optimizer updates per
rollout, samples over the run; the "What the config implies" table of `posttrain report`.

`implied(config_dict, command)` reads a resolved config as a plain dict (config.toml), so it works
for any command and for runs written by older versions: each quantity looks its keys up in the
order below (docs/report.md) and is left out when they are absent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# commands that train on a fixed data set (no rollouts)
OFFLINE = frozenset({"sft", "dpo", "reward-model", "distill"})
# keys looked up in the config, in order of preference (see docs/report.md)
PROMPTS_KEYS = ("prompts_per_step", "num_prompts", "prompt_batch_size", "batch_size")
SAMPLES_PER_PROMPT_KEYS = ("group_size", "num_generations", "samples_per_prompt", "k")
EPOCHS_KEYS = (
    "ppo_epochs",
    "inner_epochs",
    "epochs_per_rollout",
    "update_epochs",
    "num_iterations",
)
NUM_MINIBATCH_KEYS = ("num_minibatches", "num_mini_batches")
MINIBATCH_KEYS = ("mini_batch_size", "minibatch_size", "update_batch_size")
MICRO_KEYS = ("micro_batch_size", "micro_batch")
STEPS_KEYS = ("steps", "total_steps", "max_steps", "num_steps")
SEQ_KEYS = ("max_length", "max_seq_len", "max_len", "max_tokens", "seq_len")
GEN_SECTIONS = ("gen", "generation", "sampling")


def _find(
    cfg: dict[str, Any], names: Sequence[str], sections: Sequence[str] = (), anywhere: bool = True
) -> tuple:
    """(dotted key, value) of the first of `names` with a numeric value: top level first, then
    the given sections, then (if `anywhere`) any section. (None, None) when absent."""
    for name in names:
        v = cfg.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return name, v
    tables = [s for s in sections if isinstance(cfg.get(s), dict)]
    if anywhere:
        tables += [s for s, v in cfg.items() if isinstance(v, dict) and s not in tables]
    for name in names:
        for s in tables:
            v = cfg[s].get(name)
            if isinstance(v, int | float) and not isinstance(v, bool):
                return f"{s}.{name}", v
    return None, None


def implied(cfg: dict[str, Any], command: str = "") -> list[tuple[str, str, str]]:
    """(quantity, value, how it follows from the config) for what the config keys make knowable.

    Quantities whose keys are absent are left out. Batch sizes are per process: under
    `accelerate launch --num_processes N` multiply by N.
    """
    rows: list[tuple[str, str, str]] = []
    steps_key, steps = _find(cfg, STEPS_KEYS)
    if steps:  # 0 means "from epochs" in the offline commands
        rows.append(("optimizer steps (training steps)", f"{steps:g}", steps_key))
    else:
        steps = None
        epochs_key, epochs = _find(cfg, ("epochs",))
        if epochs:
            rows.append(("epochs over the training data", f"{epochs:g}", epochs_key))
    bkey, batch = _find(cfg, PROMPTS_KEYS)
    accum = (cfg.get("optim") or {}).get("grad_accum", 1) or 1
    seq_key, seq = _find(cfg, SEQ_KEYS)
    if command in OFFLINE:
        if batch is not None:
            what = "pairs" if command in ("dpo", "reward-model") else "examples"
            rows.append((f"{what} per step", f"{batch * accum:g}", f"{bkey} x optim.grad_accum"))
            if seq is not None:
                n = batch * accum * seq * (2 if what == "pairs" else 1)
                how = f"{bkey} x optim.grad_accum x {seq_key}" + (" x 2" if what == "pairs" else "")
                rows.append(("tokens per step (at most)", f"{n:g}", how))
            if steps is not None:
                rows.append((f"{what} seen", f"{batch * accum * steps:g}", f"... x {steps_key}"))
        return rows
    if batch is None:
        return rows
    rows.append(("prompts per step", f"{batch:g}", bkey))
    kkey, k = _find(cfg, SAMPLES_PER_PROMPT_KEYS, anywhere=False)
    if k is None:  # the generation section's n, never an unrelated section's
        kkey, k = _find(cfg, ("n",), GEN_SECTIONS, anywhere=False)
    k = k or 1
    samples = batch * k
    rows.append(("samples per step", f"{samples:g}", f"{bkey} x {kkey}" if kkey else bkey))
    ekey, epochs = _find(cfg, EPOCHS_KEYS)
    mkey, mini = _find(cfg, MINIBATCH_KEYS)
    ukey, micro = _find(cfg, MICRO_KEYS)
    nkey, n_mini = _find(cfg, NUM_MINIBATCH_KEYS)
    if mini is None and micro is not None:
        mkey, mini = f"{ukey} x optim.grad_accum", micro * accum
    epochs = epochs or 1
    if n_mini:
        per_epoch, how = n_mini, f"{ekey or '1 epoch'} x {nkey}"
    elif mini:
        per_epoch, how = math.ceil(samples / mini), f"{ekey or '1 epoch'} x ceil(samples / {mkey})"
    else:
        per_epoch, how = 1, ekey or "1 epoch, 1 batch"
    rows.append(("optimizer updates per rollout", f"{epochs * per_epoch:g}", how))
    gkey, new = _find(cfg, ("max_new_tokens",), GEN_SECTIONS)
    if new is not None:
        rows.append(("completion tokens per step (at most)", f"{samples * new:g}", f"... x {gkey}"))
    if steps is not None:
        rows.append(("samples generated in the run", f"{samples * steps:g}", f"... x {steps_key}"))
    return rows
