"""Data: reading tables through `datasets`, chat formatting, prompt masking, collators, and the
supervised tables of sft, distill and rft (`DataConfig`, `load_rows`, `encode_rows`).

`load_table` reads a hub dataset name, or a local CSV, JSON, JSONL, Parquet or pandas-pickle file
(or a directory saved with `save_to_disk`), through `datasets.load_dataset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from posttrain.config import ConfigError, check

if TYPE_CHECKING:
    from posttrain.tools import Toolbox

_BUILDERS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".pkl": "pandas",
    ".pickle": "pandas",
}


def load_table(source: str, split: str = "train", subset: str | None = None) -> Any:
    """A `datasets.Dataset` from a file, a saved dataset directory or a hub name."""
    import datasets

    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in _BUILDERS or path.exists():
        if not path.exists():
            raise ConfigError(f"data file {source!r} not found")
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, source)
            return ds
        if suffix not in _BUILDERS:
            raise ConfigError(
                f"cannot read {source!r}: use a .csv, .tsv, .json, .jsonl, .parquet or .pkl file"
            )
        if _BUILDERS[suffix] == "pandas":
            # datasets >= 5 refuses pickles in load_dataset; read it with pandas (a pickle can run
            # code: load only files you trust)
            import pandas as pd

            return datasets.Dataset.from_pandas(pd.read_pickle(path), preserve_index=False)
        kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
        ds = datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), split="train", **kwargs)
        return ds
    try:
        dd = datasets.load_dataset(source, subset) if subset else datasets.load_dataset(source)
    except Exception as e:  # the hub client raises many types; name the source and the fix
        raise ConfigError(
            f"cannot load dataset {source!r}"
            + (f" ({subset})" if subset else "")
            + f": {e}\nGive a local file (.csv/.json/.jsonl/.parquet/.pkl) or a hub dataset that is "
            "cached locally (HF_HUB_OFFLINE=1) or reachable online."
        ) from e
    return _pick_split(dd, split, source)


def _pick_split(dd: Any, split: str, source: str) -> Any:
    if split not in dd:
        raise ConfigError(
            f"dataset {source!r} has no split {split!r}; its splits are {', '.join(dd.keys())}"
        )
    return dd[split]


def require_columns(ds: Any, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)}; "
            f"available columns: {', '.join(ds.column_names)}. Map them in the config."
        )
    if len(ds) == 0:
        raise ConfigError(f"{source}: the dataset is empty")


# ---------------------------------------------------------------------------------------------
# Supervised examples: prompt/completion pairs, chat conversations, plain text.
#
# An encoded example is {"input_ids": [...], "labels": [...]} of equal length, with labels -100
# wherever the model is not trained to predict the token (prompt, system and user turns). The
# prompt and the completion are tokenized separately and concatenated, so the prompt tokens are
# exactly those the model sees at generation time.
#
# With `tools` (a posttrain.tools.Toolbox), text that holds tool calls also masks the tool results
# (`Toolbox.result_spans`: " = 12\n" after "<calc>3 * 4</calc>"): a tool wrote them, so the model
# is not trained to predict them. A token is masked when any of its characters lies in a result
# (the fast tokenizer's offset mapping says which characters each token covers).

IGNORE_INDEX = -100


def tool_labels(
    tok: Any, text: str, tools: Toolbox | None, *, special: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, labels) of `text`: labels are the ids, -100 on tokens that overlap a tool result."""
    if tools is None:
        ids = tok(text, add_special_tokens=special)["input_ids"]
        return ids, list(ids)
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            "masking tool results in training data needs a fast tokenizer (offset mapping)"
        )
    enc = tok(text, add_special_tokens=special, return_offsets_mapping=True)
    spans = tools.result_spans(text)
    labels = [
        IGNORE_INDEX if any(a < e and s < b for s, e in spans) else t
        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
    ]
    return list(enc["input_ids"]), labels


def encode_prompt_completion(
    tok: Any,
    prompt: str,
    completion: str,
    *,
    max_length: int,
    add_eos: bool = True,
    tools: Toolbox | None = None,
) -> dict[str, Any]:
    """Prompt tokens (labels -100) then completion tokens (+ EOS), cut to `max_length` tokens.

    Truncation keeps the start (the prompt and the first completion tokens) and drops the end.
    tools: a Toolbox; the completion's tool results get label -100.
    """
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c, c_labels = tool_labels(tok, completion, tools)
    if add_eos and tok.eos_token_id is not None:
        c, c_labels = c + [tok.eos_token_id], c_labels + [tok.eos_token_id]
    return _truncate(p + c, [IGNORE_INDEX] * len(p) + c_labels, max_length)


def encode_text(
    tok: Any, text: str, *, max_length: int, add_eos: bool = True, tools: Toolbox | None = None
) -> dict[str, Any]:
    """Plain text: every token is a label (but tool results, given `tools`)."""
    ids, labels = tool_labels(tok, text, tools, special=True)
    if add_eos and tok.eos_token_id is not None:
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
    return _truncate(ids, labels, max_length)


def encode_messages(
    tok: Any, messages: list[dict[str, str]], *, max_length: int, tools: Toolbox | None = None
) -> dict[str, Any]:
    """A conversation through the chat template; only the assistant turns are labels.

    The template is rendered for growing prefixes of the conversation: the text an assistant turn
    adds after `messages[:i]` rendered with the generation prompt is that turn's content and its
    end-of-turn marker, which become labels; everything else (system and user turns, role
    headers, and with `tools` the tool results inside an assistant turn) is masked.
    """
    if getattr(tok, "chat_template", None) is None:
        raise ConfigError(
            "conversational data needs a tokenizer with a chat template; use prompt/completion "
            "columns or plain text with this model"
        )
    if not messages:
        raise ConfigError("empty conversation (messages list with no turns)")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        if not msgs:
            return ""
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg.get("role") == "assistant":
            # with no earlier turn, the head is the template's generation prompt alone
            head = render(messages[:i], True) if i else _generation_prompt(tok)
            full = render(messages[: i + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise ConfigError(
                    "this chat template does not render a conversation as a growing prefix, so "
                    "assistant turns cannot be located for masking; use prompt/completion data"
                )
            seg = tok(head[len(done) :], add_special_tokens=False)["input_ids"]
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
            seg, seg_labels = tool_labels(tok, full[len(head) :], tools)
            ids += seg
            labels += seg_labels
        else:
            full = render(messages[: i + 1], False)
            if not full.startswith(done):
                raise ConfigError(
                    "this chat template does not render a conversation as a growing prefix; "
                    "use prompt/completion data"
                )
            seg = tok(full[len(done) :], add_special_tokens=False)["input_ids"]
            ids += seg
            labels += [IGNORE_INDEX] * len(seg)
        done = full
    return _truncate(ids, labels, max_length)


def _generation_prompt(tok: Any) -> str:
    """The text the template adds for a new assistant turn (rendered against a probe message)."""
    probe = [{"role": "user", "content": "\x00"}]
    with_gen = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    without = tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=False)
    return with_gen[len(without) :]


def _truncate(ids: list[int], labels: list[int], max_length: int) -> dict[str, Any]:
    if max_length <= 0:
        raise ConfigError(f"max_length must be positive, got {max_length}")
    truncated = len(ids) > max_length
    return {
        "input_ids": ids[:max_length],
        "labels": labels[:max_length],
        "truncated": truncated,
    }


def collate_sft(examples: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch: input_ids (B, L), attention_mask (B, L), labels (B, L) with -100 on pads."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def format_number(x: Any) -> str:
    """A number as short positional text (6 significant digits, no exponent): 6000.0 -> '6000'."""
    import numpy as np

    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return np.format_float_positional(
        float(x), precision=6, unique=False, fractional=False, trim="-"
    )


# ---------------------------------------------------------------------------------------------
# Supervised tables: rows -> encoded examples (sft, distill, rft)


@dataclass
class DataConfig:
    source: str | None = None
    """a .csv/.json/.jsonl/.parquet/.pkl file or hub dataset; unset: the rows of the [task]"""
    subset: str | None = None
    """hub dataset config name"""
    split: str = "train"
    """split to train on"""
    validation_split: str | None = None
    """split for the eval loss; unset: hold out validation_size rows of the train split"""
    validation_size: float = check(0.05, ">= 0")
    """rows held out for the eval loss when there is no validation split (< 1: a fraction)"""
    format: Literal["auto", "prompt_completion", "messages", "text", "template"] = "auto"
    """how rows become text; auto: messages, else prompt+completion, else text, else template"""
    prompt_column: str = "prompt"
    """column holding the prompt (prompt_completion format)"""
    completion_column: str = "completion"
    """column holding the completion (prompt_completion format)"""
    messages_column: str = "messages"
    """column holding a list of {role, content} messages (messages format, chat template)"""
    text_column: str = "text"
    """column holding plain text (text format: every token is trained)"""
    prompt_template: str = "{question} "
    """template format: the prompt, with {field} filled from the row (numbers shortened); the
    default is prompting's `direct` prompt, so `posttrain eval --strategy direct` matches it"""
    completion_template: str = "<answer>{answer}</answer>"
    """template format: the completion; EOS is appended"""
    max_length: int = check(256, ">= 1")
    """examples longer than this many tokens are cut at the end"""
    limit: int = check(0, ">= 0")
    """use only the first N training rows (0: all)"""


def _values(row: dict[str, Any]) -> dict[str, Any]:
    return {k: format_number(v) if isinstance(v, int | float) else v for k, v in row.items()}


def with_question(row: dict[str, Any]) -> dict[str, Any]:
    """The row with a `question`: its text `prompt` when it has none (sentiment's review openings),
    so that question templates work on every task."""
    if "question" in row or not isinstance(row.get("prompt"), str):
        return row
    return {**row, "question": row["prompt"]}


def fill(template: str, row: dict[str, Any]) -> str:
    try:
        return template.format(**_values(row))
    except KeyError as e:
        raise ConfigError(
            f"template {template!r} names the field {e}, which the rows do not have; "
            f"their fields are {', '.join(row)}"
        ) from None


def pick_format(cfg: DataConfig, columns: list[str]) -> str:
    if cfg.format != "auto":
        return cfg.format
    if cfg.messages_column in columns:
        return "messages"
    if cfg.prompt_column in columns and cfg.completion_column in columns:
        return "prompt_completion"
    if cfg.text_column in columns:
        return "text"
    return "template"


def encode_rows(
    rows: list[dict[str, Any]], tok: Any, cfg: DataConfig, fmt: str, tools: Toolbox | None = None
) -> list[dict[str, Any]]:
    """Rows -> encoded examples ({input_ids, labels}); rows left with no label token are dropped.
    With `tools`, the tool results in completions get label -100."""
    out = []
    for i, row in enumerate(rows):
        if fmt == "messages":
            ex = encode_messages(
                tok, row[cfg.messages_column], max_length=cfg.max_length, tools=tools
            )
        elif fmt == "prompt_completion":
            p, c = row[cfg.prompt_column], row[cfg.completion_column]
            if not isinstance(p, str) or not isinstance(c, str):
                raise ConfigError(f"row {i}: prompt and completion must be text, got {p!r}, {c!r}")
            ex = encode_prompt_completion(tok, p, c, max_length=cfg.max_length, tools=tools)
        elif fmt == "text":
            ex = encode_text(tok, str(row[cfg.text_column]), max_length=cfg.max_length, tools=tools)
        else:
            ex = encode_prompt_completion(
                tok,
                fill(cfg.prompt_template, row),
                fill(cfg.completion_template, row),
                max_length=cfg.max_length,
                tools=tools,
            )
        if any(x != IGNORE_INDEX for x in ex["labels"][1:]):
            out.append(ex)
    if rows and not out:
        raise ConfigError(
            f"every example lost its completion to truncation at data.max_length={cfg.max_length}; "
            "raise data.max_length"
        )
    return out


def _required(cfg: DataConfig, fmt: str) -> list[str]:
    return {
        "messages": [cfg.messages_column],
        "prompt_completion": [cfg.prompt_column, cfg.completion_column],
        "text": [cfg.text_column],
    }.get(fmt, [])


def load_rows(cfg: Any) -> tuple[list[dict], list[dict], str]:
    """(train rows, validation rows, format) from cfg.data's source or the rows of cfg.task;
    without a validation split, a seeded (cfg.run.seed) share of the train rows is held out."""
    import torch

    d = cfg.data
    if d.source is None:
        from posttrain.tasks import load_task

        task = load_task(cfg.task)
        train, val = task.rows("train"), task.rows("validation")
        fmt = "template" if d.format == "auto" else d.format
    else:
        table = load_table(d.source, d.split, d.subset)
        fmt = pick_format(d, table.column_names)
        require_columns(table, _required(d, fmt), d.source)
        train = table.to_list()
        if d.validation_split:
            val = load_table(d.source, d.validation_split, d.subset).to_list()
        else:
            n_val = (
                int(d.validation_size * len(train))
                if d.validation_size < 1
                else int(d.validation_size)
            )
            if d.validation_size > 0 and len(train) > 1:
                n_val = max(n_val, 1)
            n_val = min(n_val, len(train) - 1)
            order = torch.randperm(
                len(train), generator=torch.Generator().manual_seed(cfg.run.seed)
            )
            val = [train[i] for i in order[:n_val].tolist()]
            train = [train[i] for i in order[n_val:].tolist()]
    if d.limit:
        train = train[: d.limit]
    if not train:
        raise ConfigError("no training rows (check data.source, data.split and data.limit)")
    return train, val, fmt
