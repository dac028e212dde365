"""Preference data: (prompt, chosen, rejected) records, validation, tokenization, collation.

A record is a dict with a prompt and two completions, the preferred ("chosen") and the other
("rejected"). Two formats, as in most preference datasets:

  text:           {"prompt": "The movie was", "chosen": " great.", "rejected": " dull."}
  conversational: {"prompt": [{"role": "user", "content": "Hi"}],
                   "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}

Conversational prompts (and string prompts when `data.chat` is true) go through the tokenizer's
chat template with the generation prompt; completions are tokenized on their own and, for DPO,
end with EOS unless they were cut. Tokens are kept as prompt ids + completion ids so that the loss sees completion
tokens only: `collate_pairs` lays a batch out as a Rollout does (prompts left-padded, completions
right-padded, chosen rows first, then rejected rows), which `ops.completion_logps` reads directly.

Pairs built from a policy and a reward (`--build.enabled`) are `pair_building`'s.

Tools (a posttrain.tools.Toolbox): pairs built with tools hold the calls and their results in the
completion text; `tokenize_pairs(..., tools=)` gives each completion a mask that leaves out the tool
results (`chosen_mask`, `rejected_mask`), which `collate_pairs` makes the loss mask, so no tool
token gets a log-prob in the DPO loss (the tokens stay in the attention).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.config import ConfigError, check
from posttrain.tools import Toolbox

Record = dict[str, Any]
RewardFn = Callable[[list[Any], list[str], dict[str, list[Any]]], Any]


@dataclass
class PairsConfig:
    source: str | None = None
    """preference pairs: a .jsonl/.json/.csv/.parquet/.pkl file, a saved dataset dir or a hub dataset"""
    split: str = "train"
    """dataset split to read"""
    subset: str | None = None
    """hub dataset config name"""
    prompt_column: str = "prompt"
    """column holding the prompt (a string or a list of chat messages)"""
    chosen_column: str = "chosen"
    """column holding the preferred completion (a string or assistant message(s))"""
    rejected_column: str = "rejected"
    """column holding the dispreferred completion"""
    chat: bool = False
    """apply the chat template to string prompts too (message prompts always use it)"""
    system_prompt: str | None = None
    """system message added to chat prompts"""
    max_prompt_tokens: int = check(256, ">= 1")
    """longer prompts are errors or dropped (see on_invalid)"""
    max_completion_tokens: int = check(256, ">= 1")
    """longer completions are cut to this many tokens (counted as truncated)"""
    on_invalid: Literal["error", "drop"] = "error"
    """empty fields, chosen == rejected, prompts over budget: stop with an error, or count and drop"""
    limit: int = check(0, ">= 0")
    """use only the first N records (0: all)"""
    eval_fraction: float = check(0.1, "in [0, 1)")
    """fraction of pairs held out for evaluation (ignored when eval_source is set)"""
    eval_source: str | None = None
    """a separate file/dataset of held-out pairs"""
    eval_split: str = "test"
    """split of eval_source to read"""


@dataclass
class BuildConfig:
    enabled: bool = False
    """build pairs from a policy and the task's reward before training (writes pairs.jsonl)"""
    only: bool = False
    """stop after writing pairs.jsonl (train later with --data.source=RUN/pairs.jsonl)"""
    model: str | None = None
    """policy that samples (default: model.name, before any training)"""
    prompts: int = check(256, ">= 1")
    """number of train-split prompts of the task to sample for"""
    n: int = check(4, ">= 2")
    """completions sampled per prompt (>= 2); the best and worst form the pair"""
    temperature: float = 1.0
    """sampling temperature"""
    max_new_tokens: int = check(0, ">= 0")
    """tokens per completion (0: the task's default)"""
    min_gap: float = 0.1
    """keep a pair only if reward(best) - reward(worst) exceeds this"""
    pairs_per_prompt: int = check(1, ">= 1")
    """disjoint pairs kept per prompt: 1 = best vs worst; m = the i-th best vs the i-th worst for
    i < m (at most n // 2), each kept only if its own gap exceeds min_gap"""


# ---------------------------------------------------------------------------------------------
# Records


def _message_text(value: Any, what: str) -> str:
    """A completion as text: a string, one message dict, or a list holding one assistant message."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content") or "")
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise ConfigError(
                f"{what}: expected a string or one assistant message, got {len(value)} items; "
                "multi-turn completions are not supported (put earlier turns in the prompt)"
            )
        return str(value[0].get("content") or "")
    raise ConfigError(f"{what}: expected a string or a message, got {type(value).__name__}")


SCORE_KEYS = ("score_chosen", "score_rejected")


def normalize_record(row: Record, cfg: PairsConfig) -> Record:
    """{"prompt": str | messages, "chosen": str, "rejected": str} from a row with mapped columns,
    plus score_chosen/score_rejected where the row has them as numbers (pairs this module built)."""
    for col in (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column):
        if col not in row:
            raise ConfigError(
                f"preference record has no column {col!r}; it has {', '.join(map(repr, row))}. "
                "Map them with --data.prompt_column/--data.chosen_column/--data.rejected_column"
            )
    prompt = row[cfg.prompt_column]
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str | list):
        raise ConfigError(f"prompt must be a string or a list of messages, got {prompt!r}")
    rec: Record = {
        "prompt": prompt,
        "chosen": _message_text(row[cfg.chosen_column], "chosen"),
        "rejected": _message_text(row[cfg.rejected_column], "rejected"),
    }
    for key in SCORE_KEYS:  # the building reward's scores, kept for reading results against
        if isinstance(row.get(key), int | float) and not isinstance(row[key], bool):
            rec[key] = float(row[key])
    return rec


def record_problem(rec: Record) -> str | None:
    """Why a record cannot train (empty field, identical completions), or None."""
    prompt = rec["prompt"]
    empty_prompt = (
        not prompt.strip()
        if isinstance(prompt, str)
        else not any(str(m.get("content") or "").strip() for m in prompt)
    )
    if empty_prompt:
        return "empty prompt"
    if not rec["chosen"].strip():
        return "empty chosen"
    if not rec["rejected"].strip():
        return "empty rejected"
    if rec["chosen"].strip() == rec["rejected"].strip():
        return "chosen == rejected"
    return None


def load_records(
    cfg: PairsConfig, source: str | None = None, split: str | None = None
) -> list[Record]:
    """Normalised records from cfg.source (or the given source/split)."""
    from posttrain.data import load_table

    src = source or cfg.source
    if not src:
        raise ConfigError(
            "no preference data: give --data.source=pairs.jsonl (columns prompt/chosen/rejected) "
            "or build pairs with --build.enabled=true --task.name=..."
        )
    table = load_table(src, split=split or cfg.split, subset=cfg.subset)
    rows = table.to_list() if hasattr(table, "to_list") else list(table)
    if cfg.limit:
        rows = rows[: cfg.limit]
    if not rows:
        raise ConfigError(f"preference data {src!r} is empty")
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(normalize_record(row, cfg))
        except ConfigError as e:
            raise ConfigError(f"preference record {i} of {src}: {e}") from None
    return records


def split_records(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train, held-out): a seeded random `fraction` of the distinct prompts held out with all
    their pairs (at least 1 prompt when fraction > 0), so that no held-out prompt was seen in
    training when a prompt has several pairs. With one pair per prompt this is a split of rows."""
    if fraction <= 0:
        return records, []
    if fraction >= 1:
        raise ConfigError("data.eval_fraction must be below 1")
    keys = list(dict.fromkeys(json.dumps(r["prompt"], sort_keys=True) for r in records))
    n_eval = max(1, round(len(keys) * fraction))
    if n_eval >= len(keys):
        raise ConfigError(
            f"{len(records)} pairs over {len(keys)} prompts are too few to hold out "
            f"{fraction:.0%} of the prompts"
        )
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    held = {keys[i] for i in perm[:n_eval]}
    is_held = [json.dumps(r["prompt"], sort_keys=True) in held for r in records]
    train = [r for r, h in zip(records, is_held, strict=True) if not h]
    return train, [r for r, h in zip(records, is_held, strict=True) if h]


def write_jsonl(path: str | Path, records: list[Record]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return p


# ---------------------------------------------------------------------------------------------
# Tokenization


def prompt_text(tok: Any, prompt: str | list[dict[str, str]], cfg: PairsConfig) -> str:
    """The prompt as the model sees it: chat-templated (with the generation prompt) or raw."""
    if isinstance(prompt, str) and not cfg.chat:
        return prompt
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if cfg.system_prompt and msgs[0].get("role") != "system":
        msgs = [{"role": "system", "content": cfg.system_prompt}, *msgs]
    if getattr(tok, "chat_template", None) is None:
        raise ConfigError("message prompts need a tokenizer with a chat template")
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def tokenize_pairs(
    tok: Any,
    records: list[Record],
    cfg: PairsConfig,
    *,
    joined: bool = False,
    suffix: str = "",
    tools: Toolbox | None = None,
) -> tuple[list[Record], Counter]:
    """Validated, tokenized pairs and counts of what was dropped or truncated.

    Each item: prompt_ids, chosen_ids, rejected_ids (lists) and "index" (the record's position).
    DPO (joined=False): prompt and completions are tokenized apart, so the loss can mask the prompt
    exactly; a completion ends with EOS unless it was cut at max_completion_tokens. Reward model
    (joined=True): the whole text prompt + completion + `suffix` is tokenized as one string (as a
    reward scores it at inference) and kept in chosen_ids/rejected_ids with prompt_ids empty; it is
    cut as `joined_ids` says, never in the suffix. Errors name a record by its "row" in the file
    (`pair_records`), else by its position. With `tools` (DPO only), chosen_mask/rejected_mask hold 0 on the tokens of tool
    results and 1 elsewhere.
    """
    from posttrain.data import IGNORE_INDEX, tool_labels

    if joined and tools is not None:
        raise ValueError("tool masks are for DPO's separate completions, not joined sequences")
    counts: Counter = Counter()
    items: list[Record] = []
    eos = [tok.eos_token_id] if not joined and tok.eos_token_id is not None else []
    budget = cfg.max_completion_tokens + (cfg.max_prompt_tokens if joined else 0)
    suffix_ids = tok(suffix, add_special_tokens=False)["input_ids"] if joined and suffix else []
    for i, rec in enumerate(records):
        problem = record_problem(rec)
        text, p_ids = "", []
        if problem is None:
            text = prompt_text(tok, rec["prompt"], cfg)
            chat = cfg.chat or isinstance(rec["prompt"], list)  # templated text has its specials
            p_ids = tok(text, add_special_tokens=not chat)["input_ids"]
            if len(p_ids) > cfg.max_prompt_tokens:
                problem = f"prompt longer than {cfg.max_prompt_tokens} tokens"
        if problem is not None:
            if cfg.on_invalid == "error":
                raise ConfigError(
                    f"preference record {rec.get('row', i)}: {problem}. Fix the data, raise "
                    "data.max_prompt_tokens, or set --data.on_invalid=drop to count and skip such "
                    "records"
                )
            counts[f"dropped: {problem}"] += 1
            continue
        item: Record = {"index": i, "prompt_ids": [] if joined else p_ids}
        for key in ("chosen", "rejected"):
            if joined:
                whole = text + rec[key] + suffix
                ids, cut = joined_ids(tok, whole, budget + len(suffix_ids), chat, bool(suffix))
            else:
                ids, labels = tool_labels(tok, rec[key], tools)
                keep = [int(lab != IGNORE_INDEX) for lab in labels]
                cut = len(ids) + len(eos) > budget
                # a cut completion gets no EOS: the model must not learn to end where the text
                # went on
                ids, keep = (
                    (ids[:budget], keep[:budget]) if cut else (ids + eos, keep + [1] * len(eos))
                )
                if tools is not None:
                    item[f"{key}_mask"] = keep
            if cut:
                counts[f"truncated {key}"] += 1
            item[f"{key}_ids"] = ids
        items.append(item)
    if not items:
        raise ConfigError(f"no valid preference pairs left ({dict(counts)})")
    return items, counts


def joined_ids(
    tok: Any, text: str, max_tokens: int, chat: bool, keep_end: bool
) -> tuple[list[int], bool]:
    """(ids, whether cut) of a reward model's whole text, tokenized as one string as the reward
    tokenizes it at inference. Over max_tokens it is cut where the reward cuts it: a text that ends
    in a scoring suffix (keep_end) loses its start (`rewards.ClassifierScorer` truncates on the
    left there, so the suffix question and the text just before it survive), any other its end."""
    ids = tok(text, add_special_tokens=not chat)["input_ids"]
    if len(ids) <= max_tokens:
        return ids, False
    side, tok.truncation_side = tok.truncation_side, "left" if keep_end else "right"
    try:
        ids = tok(text, add_special_tokens=not chat, truncation=True, max_length=max_tokens)
    finally:
        tok.truncation_side = side
    return ids["input_ids"], True


@dataclass
class PairBatch:
    """B pairs as 2B rows, chosen rows [0, B) then rejected rows [B, 2B), laid out like a Rollout."""

    input_ids: torch.Tensor  # (2B, P + T) prompt left-padded, completion right-padded
    attention_mask: torch.Tensor  # (2B, P + T)
    mask: torch.Tensor  # (2B, T) 1.0 on completion tokens (less tool results); the loss sees these
    index: list[int] = field(default_factory=list)  # (B,) record index of each pair

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def n_completion(self) -> int:
        return self.mask.shape[1]

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.mask.to(device),
            self.index,
        )


def collate_pairs(items: list[Record], pad_id: int) -> PairBatch:
    """Stack pairs into one concatenated batch (one forward pass for chosen and rejected). Items
    with chosen_mask/rejected_mask (tools) leave those tokens out of the loss mask."""
    prompts = [it["prompt_ids"] for it in items] * 2
    comps = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    P, T = max(len(p) for p in prompts), max(len(c) for c in comps)
    ids = torch.full((len(prompts), P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), P + T), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, comps)):
        ids[r, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        ids[r, P : P + len(c)] = torch.tensor(c, dtype=torch.long)
        attn[r, P - len(p) : P + len(c)] = 1
    mask = attn[:, P:].float()  # (2B, T)
    if "chosen_mask" in items[0]:
        keeps = [it["chosen_mask"] for it in items] + [it["rejected_mask"] for it in items]
        for r, keep in enumerate(keeps):
            mask[r, : len(keep)] *= torch.tensor(keep, dtype=mask.dtype)
    return PairBatch(ids, attn, mask, [it["index"] for it in items])


def collate_sequences(
    items: list[Record], pad_id: int, *, left: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole prompt + completion sequences, chosen rows then rejected rows: (2B, L) ids and mask.

    Left padding (decoders) puts every sequence's last token in the last column, where a causal
    LM's classification head reads its score; encoders read the first token and pad on the right.
    """
    seqs = [it["prompt_ids"] + it["chosen_ids"] for it in items]
    seqs += [it["prompt_ids"] + it["rejected_ids"] for it in items]
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    for r, s in enumerate(seqs):
        cols = slice(L - len(s), L) if left else slice(0, len(s))
        ids[r, cols] = torch.tensor(s, dtype=torch.long)
        attn[r, cols] = 1
    return ids, attn
