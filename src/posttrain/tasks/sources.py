"""Where task rows come from: embedded package data, files, or hub datasets, with splits.

`split_rows(cfg, split, defaults)` returns the rows (plain dicts) of one split:
- a hub dataset (or a directory saved with `save_to_disk`) that has the split: its rows, shuffled by the seed, capped at the split's size;
- a hub dataset without it (e.g. no "validation"): carved from "train" (validation and test take
  the first rows of the seeded shuffle, train the rest, so they never overlap);
- a file (CSV, JSON, JSONL, Parquet, pandas pickle: posttrain.data.load_table) or embedded data has
  no splits: its rows are shuffled by the seed and cut into test, validation and train in that order.
Sizes come from TaskConfig.{train,validation,test}_size, else the task's defaults; a split of a file
that is too small for the asked sizes keeps what there is (test first), and an empty split is an
error.

Text helpers: `first_words` keeps the first n whitespace-separated words (or n tokens of a given
tokenizer).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError
from posttrain.tasks.base import TaskConfig

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".pkl", ".pickle")


def sizes(cfg: TaskConfig, defaults: dict[str, int]) -> dict[str, int]:
    asked = {"train": cfg.train_size, "validation": cfg.validation_size, "test": cfg.test_size}
    return {s: asked[s] or defaults[s] for s in SPLITS}


def carve(rows: list[Any], split: str, seed: int, want: dict[str, int], source: str) -> list[Any]:
    """One split of an unsplit list: shuffled by seed, test first, then validation, then train.

    Train takes every remaining row unless a train size was asked for."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use train, validation or test")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = min(want["test"], len(rows))
    n_val = min(want["validation"], len(rows) - n_test)
    bounds = {
        "test": (0, n_test),
        "validation": (n_test, n_test + n_val),
        "train": (n_test + n_val, len(rows)),
    }
    lo, hi = bounds[split]
    if split == "train" and want.get("train_cap"):
        hi = min(hi, lo + want["train_cap"])
    picked = [rows[i] for i in order[lo:hi]]
    if not picked:
        raise ConfigError(
            f"{source}: the {split} split is empty ({len(rows)} rows in all, {n_test} for test and "
            f"{n_val} for validation). Give more rows or smaller --task.test_size/--task.validation_size."
        )
    return picked


def split_rows(
    cfg: TaskConfig, split: str, defaults: dict[str, int], needed: list[str]
) -> list[dict[str, Any]]:
    """Rows of one split from cfg.source (see the module docstring). `needed`: required columns."""
    from posttrain.data import require_columns

    assert cfg.source is not None
    want = sizes(cfg, defaults)
    path = Path(cfg.source).expanduser()
    if path.suffix.lower() in FILE_SUFFIXES or path.is_file():  # a file: no splits
        ds = load_file(cfg.source, cfg.subset)
        require_columns(ds, needed, cfg.source)
        rows = ds.to_list()
        if cfg.train_size:
            want = {**want, "train_cap": cfg.train_size}
        return carve(rows, split, cfg.seed, want, cfg.source)
    dd = _hub(cfg)
    if "train" not in dd and any(x not in dd for x in SPLITS):
        raise ConfigError(f"{cfg.source}: no train split to carve the missing splits from")
    missing = [x for x in ("test", "validation") if x not in dd]  # carved from train, in this order
    if split in dd and split != "train":
        ds = dd[split].shuffle(seed=cfg.seed)
    else:
        base = dd["train"].shuffle(seed=cfg.seed)
        offsets, off = {}, 0
        for x in missing:
            offsets[x], off = off, off + want[x]
        if split == "train":
            ds = base.select(range(min(off, len(base)), len(base)))
        else:
            ds = base.select(
                range(min(offsets[split], len(base)), min(offsets[split] + want[split], len(base)))
            )
    require_columns(ds, needed, f"{cfg.source} ({split})")
    return ds.select(range(min(want[split], len(ds)))).to_list()


def load_file(source: str, subset: str | None = None) -> Any:
    """A whole local table (posttrain.data.load_table), with read errors named."""
    from posttrain.data import load_table

    try:
        ds = load_table(source, "train", subset)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read {source!r} (is it empty?): {e}") from e
    if len(ds) == 0:
        raise ConfigError(f"{source}: the file has no rows")
    return ds


def _hub(cfg: TaskConfig) -> Any:
    import datasets

    if Path(cfg.source or "").expanduser().is_dir():  # saved with save_to_disk
        dd = datasets.load_from_disk(str(Path(cfg.source or "").expanduser()))
        return dd if isinstance(dd, datasets.DatasetDict) else datasets.DatasetDict({"train": dd})
    try:
        return (
            datasets.load_dataset(cfg.source, cfg.subset)
            if cfg.subset
            else datasets.load_dataset(cfg.source)
        )
    except Exception as e:  # the hub client raises many types; name the source and the fix
        raise ConfigError(
            f"cannot load dataset {cfg.source!r}"
            + (f" ({cfg.subset})" if cfg.subset else "")
            + f": {e}\nGive a local file (.csv/.json/.jsonl/.parquet/.pkl) or a hub dataset that is "
            "cached locally (HF_HUB_OFFLINE=1) or reachable online."
        ) from e


def first_words(text: str, n: int, tokenizer: Any = None) -> str:
    """The first n whitespace words of `text` (or its first n tokens, with a tokenizer)."""
    text = clean(text)
    if tokenizer is not None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n]
        return tokenizer.decode(ids)
    return " ".join(text.split()[:n])


def clean(text: str) -> str:
    """Strip HTML line breaks (IMDB reviews carry `<br />`) and squeeze whitespace."""
    return " ".join(re.sub(r"<br\s*/?>", " ", str(text)).split())


def read_lines(name: str) -> list[str]:
    return [line.strip() for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]
