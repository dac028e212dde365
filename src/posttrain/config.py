"""Configs: nested dataclasses, loaded from TOML, with dotted command-line overrides.

Every command has one config dataclass (for example `posttrain.algos.sft.Config`). Its fields carry
a one-line docstring written right under the field; `config_text.field_docs` reads them from the
source so that `posttrain <command> --help` shows them. Sections are nested dataclasses (`[model]`,
`[gen]`, ...). Field types and value conversion live in `config_types.py`, the help page and TOML
writing in `config_text.py`.

    cfg = load_config(Config, "configs/sft.toml", ["--optim.lr=1e-5", "--model", "default"])

Unknown keys and values that do not fit the field's type are errors that name the key and list the
valid ones; nothing is silently ignored. A field's range is its metadata, written with `check`:

    lr: float = check(1e-5, "> 0")   # then the field's docstring, as for any field

`load_config` checks every rule of every section once, for every command (`check_config`; the
training setup calls it again for configs built in Python), and each broken rule is one line that
names the key: `optim.lr must be > 0, got -1.0`. `config_text.save_config` writes the resolved
config as TOML.

Renamed keys (docs/glossary.md): a config class lists its deprecated names in `RENAMED`, old
dotted key -> new dotted key, or -> `Renamed(new, how)` where the value changes meaning too:

    RENAMED: ClassVar[dict[str, str | Renamed]] = {"cliprange": "clip_range", "kl.coef": "kl_coef"}

An old name works in a TOML file and on the command line, and `load_config` prints one line per
old name to stderr: `posttrain: 'cliprange' is now 'clip_range'; the old name still works`. A
printed note, not a `DeprecationWarning`: it is addressed to the user who wrote the config, who
never sees Python warnings, and it names the key to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from posttrain.config_types import ConfigError, coerce, field_types, is_section

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


_OPS: dict[str, Any] = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
}
_INTERVAL = re.compile(r"in ([\[(])\s*(\S+?)\s*,\s*(\S+?)\s*([\])])$")
_COMPARE = re.compile(r"(>=|<=|>|<)\s*(\S+)$")


def _parse_rule(rule: str) -> list[tuple[str, str]]:
    """'>= 1 and <= batch_size' -> [('>=', '1'), ('<=', 'batch_size')]; 'run directory' as is."""
    parts: list[tuple[str, str]] = []
    for part in (p.strip() for p in rule.split(" and ")) if rule else []:
        if part == "run directory":
            parts.append((part, ""))
        elif m := _INTERVAL.match(part):
            lo, a, b, hi = m.groups()
            parts += [(">=" if lo == "[" else ">", a), ("<=" if hi == "]" else "<", b)]
        elif m := _COMPARE.match(part):
            parts.append((m.group(1), m.group(2)))
        else:
            raise ValueError(f"bad check rule {rule!r}")
    return parts


def check(
    default: Any = dataclasses.MISSING, rule: str = "", *, default_factory: Any = None
) -> Any:
    """A dataclass field whose value must satisfy `rule`, checked by `load_config`.

    Rules: a comparison with a number or with another field of the same section (`"> 0"`,
    `">= 1"`, `"<= batch_size"`), an interval (`"in [0, 1]"`, `"in (0, 1]"`), several joined by
    `" and "`, or `"run directory"` (a folder with a config.toml). `None` values pass; a list's
    rule applies to each item.
    """
    _parse_rule(rule)  # a typo in a rule fails at import, not when a user hits it
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"check": rule})
    return field(default=default, metadata={"check": rule})


@dataclass(frozen=True)
class Renamed:
    """A deprecated key whose value also changes meaning: the new key is set to
    how(cfg, old value) once every other value is set (so it may read other fields)."""

    new: str
    """the new dotted key"""
    how: Callable[[Any, Any], Any]
    """(config with every other value set, the old value as `type`) -> the new key's value"""
    type: Any = int
    """the old key's type"""
    hint: str = ""
    """how the value converts, for the note (`num_minibatches = rollout rows / mini_batch_size`)"""


def _renames(cls: type) -> dict[str, str | Renamed]:
    return getattr(cls, "RENAMED", {})


def _note(notes: dict[str, str], old: str, new: str | Renamed) -> None:
    """One line per old name, printed once by `load_config`."""
    if isinstance(new, Renamed):
        target = f"'{new.new}'" + (f" ({new.hint})" if new.hint else "")
    else:
        target = f"'{new}'"
    notes.setdefault(old, f"posttrain: '{old}' is now {target}; the old name still works")


def _rename_table(
    data: dict[str, Any],
    renamed: dict[str, str | Renamed],
    notes: dict[str, str],
    later: dict[str, Any],
) -> dict[str, Any]:
    """Move each old key of a TOML document to its new dotted place (`kl.coef` is `[kl] coef`);
    a section left empty goes. Values of `Renamed` keys go to `later`. Both names -> error."""
    for old, new in renamed.items():
        *path, last = old.split(".")
        tables = [data]
        for part in path:
            nxt = tables[-1].get(part)
            if not isinstance(nxt, dict):
                break
            tables.append(nxt)
        if len(tables) != len(path) + 1 or last not in tables[-1]:
            continue
        value = tables[-1].pop(last)
        for parent, part, table in reversed(list(zip(tables, path, tables[1:]))):
            if not table:
                del parent[part]
        _note(notes, old, new)
        target = new.new if isinstance(new, Renamed) else new
        *npath, nlast = target.split(".")
        table = data
        for part in npath:
            table = table.setdefault(part, {})
        if nlast in table:
            raise ConfigError(f"config keys '{old}' and '{target}' are one key; keep '{target}'")
        if isinstance(new, Renamed):
            later[old] = value
        else:
            table[nlast] = value
    return data


# ---------------------------------------------------------------------------------------------
# Shared config sections (used by three or more commands)


@dataclass
class ModelConfig:
    name: str = "default"
    """model to load: `default` (embedded SmolLM2-135M-Instruct), a hub id, a local directory or a .gguf file"""
    adapter: str | None = None
    """a saved LoRA adapter directory to load on top of the model"""
    dtype: str = "auto"
    """auto (fp32 on CPU, bf16 on a capable GPU), float32, bfloat16 or float16"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    trust_remote_code: bool = False
    """allow model code from the hub to run; off unless you trust the repository"""
    revision: str | None = None
    """hub revision (branch, tag or commit)"""


@dataclass
class LoraConfig:
    enabled: bool = False
    """train a LoRA adapter instead of all weights"""
    r: int = check(16, ">= 1")
    """LoRA rank"""
    alpha: int = check(64, "> 0")
    """LoRA alpha (scaling = alpha / r); about 4x the rank works well"""
    dropout: float = check(0.0, "in [0, 1)")
    """dropout on the LoRA input"""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """module names to adapt; ["all-linear"] adapts every linear layer but the output head"""


@dataclass
class OptimConfig:
    lr: float = check(1e-5, "> 0")
    """peak learning rate (AdamW)"""
    weight_decay: float = check(0.0, ">= 0")
    """AdamW weight decay"""
    betas: list[float] = check(rule="in [0, 1)", default_factory=lambda: [0.9, 0.999])
    """AdamW betas"""
    eps: float = check(1e-8, ">= 0")
    """AdamW epsilon"""
    warmup_steps: int = check(0, ">= 0")
    """linear warm-up steps"""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """learning-rate schedule after warm-up"""
    max_grad_norm: float = check(1.0, ">= 0")
    """gradient clipping by global norm; 0 disables"""
    grad_accum: int = check(1, ">= 1")
    """micro-batches accumulated per optimizer step"""


@dataclass
class RunConfig:
    out_dir: str = "runs"
    """parent directory of run directories"""
    name: str | None = None
    """run directory name (default: command and time); a new suffix is added if it exists"""
    seed: int = 0
    """seed for python, numpy and torch"""
    log_every: int = check(1, ">= 1")
    """log one metrics line every this many steps"""
    sample_every: int = check(10, ">= 0")
    """write generations to samples.jsonl every this many steps (0: never)"""
    save_every: int = check(0, ">= 0")
    """checkpoint every this many steps (0: only at the end)"""
    keep_checkpoints: int = check(2, ">= 1")
    """how many checkpoints to keep"""
    resume: str | None = check(None, "run directory")
    """a run directory to continue from its last checkpoint"""
    tensorboard: bool = False
    """also write TensorBoard event files into the run directory"""
    threads: int = check(0, ">= 0")
    """torch CPU threads (0: torch's default)"""
    progress: bool = True
    """show progress bars"""
    autocast: Literal["no", "bfloat16"] = "no"
    """bfloat16: run the command under torch.autocast (bf16 matmuls, fp32 weights and optimizer; ~1.5x faster on a CPU with bf16 support)"""
    onednn: bool | Literal["auto"] = "auto"
    """fp32 linear layers on the CPU through oneDNN instead of torch's kernel (MKL): auto chooses by timing both on the model's own shapes on this machine, for training and for decoding separately (printed; cached in the cache directory's kernels.json, see posttrain/cpu.py); true: oneDNN for both; false: torch's kernels"""
    reuse_memory: bool = True
    """keep memory torch frees inside the process (glibc heap, no trimming) instead of paying ~1 GB of fresh page faults per training step; false: glibc's defaults"""


# ---------------------------------------------------------------------------------------------
# Setting values: TOML tables and dotted command-line overrides


def _unknown(key: str, valid: list[str]) -> ConfigError:
    last = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(last, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(valid)}")


def _apply(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass instance `obj` from a nested dict, recursing into sections."""
    hints = field_types(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise _unknown(full, names)
        tp = hints[key]
        if is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it as [{full}] table")
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, coerce(value, tp, full))


def _set_dotted(obj: Any, dotted: str, raw: Any) -> None:
    *path, last = dotted.split(".")
    target = obj
    prefix = ""
    for part in path:
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names or not is_section(field_types(type(target))[part]):
            sections = [n for n in names if is_section(field_types(type(target))[n])]
            raise _unknown(prefix + part, sections)
        target = getattr(target, part)
        prefix += part + "."
    hints = field_types(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    if last not in names:
        raise _unknown(dotted, names)
    tp = hints[last]
    if is_section(tp):
        raise ConfigError(
            f"config key '{dotted}' is a section; set one of its keys, e.g. --{dotted}.x"
        )
    # Repeated list flags (--prompt a --prompt b) accumulate.
    if get_origin(tp) is list and isinstance(raw, list):
        setattr(target, last, [coerce(r, get_args(tp)[0], dotted) for r in raw])
        return
    setattr(target, last, coerce(raw, tp, dotted))


def parse_overrides(
    args: list[str], cls: type, notes: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """Turn ['--a.b=1', '--flag', '--x', 'v', '--p', 'q', '--p', 'r'] into (key, value) pairs.

    A flag with no value is `true` (for a boolean field). A key repeated for a list field collects
    its values. Keys named in the class's `ALIASES` dict (short names) are expanded first, then
    old names in its `RENAMED` dict become their new names (a `Renamed` key stays as it is, for
    `load_config` to convert); each old name used is noted in `notes`.
    """
    aliases: dict[str, str] = getattr(cls, "ALIASES", {})
    renamed = _renames(cls)
    notes = {} if notes is None else notes
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            key = body
            nxt = args[i + 1] if i + 1 < len(args) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 2
            else:
                value, i = "true", i + 1
        key = aliases.get(key, key).replace("-", "_")
        if key in renamed:
            _note(notes, key, renamed[key])
            new = renamed[key]
            key = key if isinstance(new, Renamed) else new
        pairs.append((key, value))
    merged: dict[str, Any] = {}
    for key, value in pairs:
        tp = _field_type(cls, key)
        if get_origin(tp) in (Union, types.UnionType):  # list[str] | None -> list[str]
            inner = [a for a in get_args(tp) if a is not type(None)]
            tp = inner[0] if len(inner) == 1 and value.lower() not in ("none", "null") else tp
        if tp is not None and get_origin(tp) is list:
            merged.setdefault(key, [])
            merged[key] = merged[key] + _list_items(value, get_args(tp)[0])
        else:
            merged[key] = value
    return list(merged.items())


def _list_items(value: str, inner: Any) -> list[Any]:
    """'[1, 2]' as a TOML array; otherwise one string per flag, or comma-separated numbers."""
    if value.strip().startswith("["):
        try:
            return list(tomllib.loads(f"v = {value}")["v"])
        except tomllib.TOMLDecodeError:
            raise ConfigError(f'{value!r} is not a TOML array like [1, 2] or ["a", "b"]') from None
    if inner is str:
        return [value]
    return [v.strip() for v in value.split(",") if v.strip()]


def _field_type(cls: type, dotted: str) -> Any:
    tp: Any = cls
    for part in dotted.split("."):
        if not is_section(tp):
            return None
        hints = field_types(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


# ---------------------------------------------------------------------------------------------
# Range rules (field metadata)


def _rule_errors(obj: Any, key: str, value: Any, rule: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in _rule_errors(obj, f"{key}[{i}]", v, rule)]
    for op, operand in _parse_rule(rule):
        if op == "run directory":
            if not (Path(value) / "config.toml").is_file():
                what = "does not exist" if not Path(value).exists() else "has no config.toml"
                return [f"{key} must be a run directory, but {str(value)!r} {what}"]
            continue
        try:
            bound: Any = float(operand)
        except ValueError:  # another field of the same section
            bound = getattr(obj, operand)
            if bound is None:
                continue
            rule = re.sub(rf"\b{operand}\b", f"{operand} ({bound})", rule)
        if not _OPS[op](value, bound):
            return [f"{key} must be {rule}, got {value!r}"]
    return []


def check_config(cfg: Any) -> None:
    """Check every field's `check` rule in `cfg` and its sections; one ConfigError listing every
    broken rule on one line, each naming its dotted key."""

    def walk(obj: Any, prefix: str) -> list[str]:
        errors: list[str] = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                errors += walk(value, f"{prefix}{f.name}.")
            elif f.metadata.get("check"):
                errors += _rule_errors(obj, prefix + f.name, value, f.metadata["check"])
        return errors

    errors = walk(cfg, "")
    if errors:
        raise ConfigError("; ".join(errors))


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Build `cls()` with values from a TOML file, then from dotted command-line overrides.
    Old names (`cls.RENAMED`) work in both; one note per old name goes to stderr."""
    cfg = cls()
    renamed = _renames(cls)
    notes: dict[str, str] = {}
    later: dict[str, Any] = {}  # old key of a `Renamed` -> its value, converted last
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
        _apply(cfg, _rename_table(data, renamed, notes, later))
    pairs = parse_overrides(overrides or [], cls, notes)
    converted = {old: new for old, new in renamed.items() if isinstance(new, Renamed)}
    for key, value in pairs:
        if key in converted:
            later[key] = value
            continue
        for old, new in converted.items():  # the new name on the command line wins over the file
            if new.new == key:
                if any(k == old for k, _ in pairs):
                    raise ConfigError(f"--{old} and --{key} are one key; keep --{key}")
                later.pop(old, None)
        _set_dotted(cfg, key, value)
    for old, value in later.items():
        new = converted[old]
        _set_dotted(cfg, new.new, new.how(cfg, coerce(value, new.type, old)))
    if notes and os.environ.get("RANK", "0") == "0":  # once, not once per process
        print("\n".join(notes.values()), file=sys.stderr, flush=True)
    check_config(cfg)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg
