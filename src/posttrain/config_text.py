"""Configs as text: the `posttrain <command> --help` page (every key with its type, default, rule
and the docstring under its field, read from the source by `field_docs`), and the resolved config
as TOML (`to_toml`, `save_config`: the config.toml of every run directory).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from enum import Enum
from pathlib import Path
from typing import Any

from posttrain.config import Renamed
from posttrain.config_types import field_types, is_section, type_name


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (empty if unavailable)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for prev, node in zip(body, body[1:]):
            if (
                isinstance(prev, ast.AnnAssign)
                and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config (Enums as values)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, list | tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} to TOML")


def to_toml(cfg: Any) -> str:
    """The config as TOML text. `None` values are left out (TOML has no null; they are defaults)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], name: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) or k in _dict_fields}
        tables = {k: v for k, v in d.items() if isinstance(v, dict) and k not in _dict_fields}
        if name:
            lines.append(f"\n[{name}]")
        for k, v in scalars.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(v, f"{name}.{k}" if name else k)

    _dict_fields: set[str] = set()
    emit(to_dict(cfg), "")
    return "\n".join(lines).lstrip() + "\n"


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(to_toml(cfg))


def help_text(cls: type, command: str = "") -> str:
    """A `--help` page listing every key with its type, default and doc."""
    out = [f"usage: posttrain {command} [--config FILE.toml] [--section.key=value ...]", ""]
    doc = inspect.getdoc(inspect.getmodule(cls)) or ""
    if doc:
        out += [doc.split("\n\n")[0], ""]
    aliases = getattr(cls, "ALIASES", {})
    if aliases:
        out.append("short options: " + ", ".join(f"--{a} = --{k}" for a, k in aliases.items()))
        out.append("")
    renamed = getattr(cls, "RENAMED", {})
    if renamed:
        news = {o: n.new if isinstance(n, Renamed) else n for o, n in renamed.items()}
        out.append(
            "old names, still accepted: " + ", ".join(f"--{o} -> --{n}" for o, n in news.items())
        )
        out.append("")

    def walk(klass: type, obj: Any, prefix: str) -> None:
        docs = field_docs(klass)
        hints = field_types(klass)
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if is_section(tp):
                continue
            default = to_dict(getattr(obj, f.name))
            rule = f", must be {f.metadata['check']}" if f.metadata.get("check") else ""
            out.append(f"  --{prefix}{f.name}  ({type_name(tp)}, default {default!r}{rule})")
            if f.name in docs:
                out.append(f"      {docs[f.name]}")
        for f in dataclasses.fields(klass):
            tp = hints[f.name]
            if is_section(tp):
                out.append(f"\n [{prefix}{f.name}]")
                walk(tp, getattr(obj, f.name), f"{prefix}{f.name}.")

    walk(cls, cls(), "")
    return "\n".join(out)
