"""Data: reading tables through `datasets`, chat formatting, prompt masking, collators.

`load_table` reads a hub dataset name, or a local CSV, JSON, JSONL, Parquet or pandas-pickle file
(or a directory saved with `save_to_disk`), through `datasets.load_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import ConfigError

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
