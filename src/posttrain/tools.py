"""Tools the model calls while it generates: a calculator, or any typed Python function.

A tool is a Python function with typed arguments and a docstring, named like a python reward:
`calculator` (shipped, `posttrain.tools:calc`), `package.module:function` or
`path/to/file.py:function`. Several can be given at once (`--tools.names calculator --tools.names
my_tools.py:lookup`).

Call formats (`tools.format`):
  tag   the default, an inline tag pair that any model learns by SFT. The tag is the function's
        name; its text is the function's first argument (or a JSON object of its arguments):
            <calc>37 * 1.609344</calc> = 59.545728\\n
        The result, " = {result}\\n", is inserted by the sampler right after the closing tag.
  json  the Hermes/Qwen style that chat templates with `tools=` use, the tools' JSON schemas given
        to the template:
            <tool_call>{"name": "calc", "arguments": {"expression": "2 + 2"}}</tool_call>
            <tool_response>4</tool_response>

`rollout.generate(..., tools=Toolbox)`: when a row closes a call, the tool runs and its result's
tokens are fed to that row one per decoding step, as if sampled, while the other rows go on
sampling; `Rollout.tool_mask` marks them, and no algorithm gives them log-probs, loss or KL.
Limits per completion: `max_calls` calls, `max_result_tokens` result tokens per call,
`timeout_s` seconds per call. A tool that raises, times out or gets bad arguments gives the
model an error text ("error: ..."); it never stops a run.

The calculator never runs `eval` on model text: it parses the expression with `ast` and walks the
tree, allowing numbers, + - * / ** and parentheses only, with bounded length, exponents and
results, in exact rational arithmetic (37 * 1.609344 is exactly 59.545728).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

from posttrain.config import ConfigError, check


@dataclass
class ToolConfig:
    names: list[str] = field(default_factory=list)
    """tools the model may call while generating: calculator, module:function or file.py:function (empty: none)"""
    format: Literal["tag", "json"] = "tag"
    """call format: tag (<calc>1 + 2</calc> = 3) or json (<tool_call>{...}</tool_call>, the chat templates' style)"""
    max_calls: int = check(4, ">= 1")
    """tool calls per completion; later calls get an error text"""
    max_result_tokens: int = check(32, ">= 1")
    """tokens a call's result may insert (a longer result is cut and ends in ...)"""
    timeout_s: float = check(2.0, "> 0")
    """seconds a call may take before the model gets an error text"""


class ToolError(ValueError):
    """A tool refused its input; the message is what the model reads after "error: "."""


# ---------------------------------------------------------------------------------------------
# The calculator

MAX_EXPRESSION_CHARS = 200
MAX_NODES = 64
MAX_EXPONENT = 64
MAX_ABS = Fraction(10) ** 30
MAX_DENOMINATOR_BITS = 256


def format_number(x: float | Fraction, digits: int = 10) -> str:
    """A number as a model should read and write it: up to `digits` significant digits, no exponent
    unless very large or small, no trailing zeros (6000, 0.125, 59.545728, 1.5e-09)."""
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e15 or abs(x) < 1e-6:
        mant, exp = f"{x:.{digits - 1}e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    s = f"{x:.{decimals}f}"
    return s.rstrip("0").rstrip(".") if "." in s else s


def _checked(x: Fraction) -> Fraction:
    if abs(x) > MAX_ABS:
        raise ToolError("result too large")
    if x.denominator.bit_length() > MAX_DENOMINATOR_BITS:  # keep exact arithmetic cheap
        x = x.limit_denominator(1 << MAX_DENOMINATOR_BITS)
    return x


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if abs(exp) > MAX_EXPONENT:
        raise ToolError(f"exponent {format_number(exp)} is out of range (at most {MAX_EXPONENT})")
    if exp.denominator == 1:
        if base == 0 and exp < 0:
            raise ToolError("division by zero")
        if abs(base) > 1 and exp * math.log10(float(abs(base))) > 30:  # before computing it
            raise ToolError("result too large")
        return _checked(base ** int(exp))
    if base < 0:
        raise ToolError("a negative number to a fractional power")
    return _checked(Fraction(float(base) ** float(exp)))


_BINARY: dict[type, Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.Pow: _power,
}


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ToolError(f"only numbers are allowed, not {v!r}")
        return _checked(Fraction(str(v)) if isinstance(v, float) else Fraction(v))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Div) and b == 0:
            raise ToolError("division by zero")
        return _checked(_BINARY[type(node.op)](a, b))
    if isinstance(node, ast.Name):
        raise ToolError(f"names are not allowed ({node.id})")
    if isinstance(node, ast.Attribute):
        raise ToolError("attributes are not allowed")
    if isinstance(node, ast.Call):
        raise ToolError("function calls are not allowed")
    raise ToolError(f"{type(node).__name__} is not allowed: use numbers, + - * / ** and ()")


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression: numbers, + - * / ** and parentheses.

    Args:
        expression: the arithmetic to do, for example "37 * 1.609344" or "(98.6 - 32) * 5/9"
    """
    text = str(expression).strip().replace("×", "*").replace("÷", "/").replace("^", "**")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,250
    if not text:
        raise ToolError("empty expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {text!r}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ToolError(f"expression has more than {MAX_NODES} parts")
    return format_number(_eval(tree))


BUILTIN: dict[str, Callable[..., Any]] = {"calculator": calc, "calc": calc}


# ---------------------------------------------------------------------------------------------
# Loading tools, finding and running calls


@dataclass
class ToolCall:
    """One call a completion made: the tool, its argument text, the result text the model read."""

    tool: str
    call: str
    result: str
    error: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"tool": self.tool, "call": self.call, "result": self.result, "error": self.error}


def load_tool(spec: str) -> Callable[..., Any]:
    """`calculator`, `module:function` or `file.py:function` -> the function."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ConfigError(
            f"tool {spec!r}: use calculator, module:function or path/to/file.py:function"
        )
    from posttrain.rewards import load_function

    return load_function(spec, kind="tool")


def _run_with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """fn() in a daemon thread; raises TimeoutError after `timeout` seconds (the thread is left
    to finish on its own: Python cannot kill it, and a daemon thread never blocks exit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - any failure becomes the model's error text
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no result within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Toolbox:
    """Loaded tools with their settings: finds calls in generated text, runs them, formats results."""

    def __init__(self, cfg: ToolConfig, tools: dict[str, Callable[..., Any]]):
        if not tools:
            raise ConfigError("a Toolbox needs at least one tool (tools.names)")
        if cfg.format not in ("tag", "json"):
            raise ConfigError(f"tools.format={cfg.format!r}: use tag or json")
        for key in ("max_calls", "max_result_tokens"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"tools.{key} must be >= 1, got {getattr(cfg, key)}")
        if not cfg.timeout_s > 0:
            raise ConfigError(f"tools.timeout_s must be > 0, got {cfg.timeout_s}")
        self.cfg = cfg
        self.tools = tools
        names = "|".join(re.escape(n) for n in tools)
        if cfg.format == "tag":
            self._call = re.compile(rf"<({names})>(.*?)</\1>", re.DOTALL)
            self._result = re.compile(rf"</({names})>( = [^\n]*(?:\n|$))")
            self.closers = [f"</{n}>" for n in tools]
        else:
            self._call = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
            self._result = re.compile(r"</tool_call>(\n?<tool_response>.*?</tool_response>\n?)", re.DOTALL)  # fmt: skip
            self.closers = ["</tool_call>"]
        self.last_chars = {c[-1] for c in self.closers}

    @classmethod
    def from_config(cls, cfg: ToolConfig | None) -> Toolbox | None:
        """None when no tools are named."""
        if cfg is None or not cfg.names:
            return None
        tools: dict[str, Callable[..., Any]] = {}
        for spec in cfg.names:
            fn = load_tool(spec)
            tools[fn.__name__] = fn
        return cls(cfg, tools)

    # -- what the model is told ---------------------------------------------------------------

    def schemas(self) -> list[dict[str, Any]]:
        """JSON schemas of the tools, for a chat template's `tools=` (transformers' own reader of
        type hints and Google-style docstrings)."""
        from transformers.utils import get_json_schema

        return [get_json_schema(fn) for fn in self.tools.values()]

    def describe(self) -> str:
        """A short instruction naming the tools and the call format (for prompts)."""
        lines = []
        for name, fn in self.tools.items():
            doc = (inspect.getdoc(fn) or "").split("\n")[0]
            if self.cfg.format == "tag":
                lines.append(f"<{name}>...</{name}>: {doc}")
            else:
                lines.append(f"{name}: {doc}")
        return "Tools: " + "; ".join(lines)

    # -- finding and running calls ------------------------------------------------------------

    def find_call(self, text: str) -> tuple[str, str, int] | None:
        """The first complete call in `text` -> (tool name, argument text, end offset), or None."""
        m = self._call.search(text)
        if m is None:
            return None
        if self.cfg.format == "tag":
            return m.group(1), m.group(2), m.end()
        return "", m.group(1), m.end()

    def run(self, name: str, args: str) -> ToolCall:
        """Run one call; every failure becomes an error text for the model, never an exception."""
        try:
            tool, call, fn, kwargs = self._parse(name, args)
        except ToolError as e:
            return ToolCall(name or "?", args.strip(), f"error: {e}", error=True)
        try:
            value = _run_with_timeout(lambda: fn(**kwargs), self.cfg.timeout_s)
            return ToolCall(tool, call, str(value))
        except Exception as e:  # noqa: BLE001 - a tool's failure is the model's to read
            msg = str(e) or type(e).__name__
            return ToolCall(tool, call, f"error: {msg}", error=True)

    def _parse(self, name: str, args: str) -> tuple[str, str, Callable[..., Any], dict[str, Any]]:
        if self.cfg.format == "json":
            try:
                obj = json.loads(args)
                name, kwargs = obj["name"], obj.get("arguments", {})
            except (ValueError, KeyError, TypeError):
                raise ToolError('a call is {"name": ..., "arguments": {...}}') from None
            if not isinstance(kwargs, dict):
                raise ToolError("arguments must be a JSON object")
        else:
            kwargs = None
        fn = self.tools.get(name)
        if fn is None:
            raise ToolError(f"no tool {name!r}; tools: {', '.join(self.tools)}")
        params = list(inspect.signature(fn).parameters)
        if kwargs is None:  # tag format: the text is the first argument, or a JSON object of them
            stripped = args.strip()
            kwargs = None
            if stripped.startswith("{") and len(params) > 1:
                try:
                    kwargs = json.loads(stripped)
                except ValueError:
                    kwargs = None
            if not isinstance(kwargs, dict):
                if not params:
                    raise ToolError(f"{name} takes no arguments")
                kwargs = {params[0]: stripped}
        unknown = [k for k in kwargs if k not in params]
        if unknown:
            raise ToolError(
                f"{name} has no argument {unknown[0]!r}; arguments: {', '.join(params)}"
            )
        return name, args.strip(), fn, kwargs

    def format_result(self, result: str) -> str:
        """The text inserted after a call."""
        if self.cfg.format == "tag":  # one line: the model goes on after the newline
            return f" = {result.replace(chr(10), ' ').strip()}\n"
        return f"\n<tool_response>\n{result}\n</tool_response>\n"

    def result_ids(self, tokenizer: Any, result: str) -> list[int]:
        """Token ids of a formatted result, at most `max_result_tokens` in all: a longer result
        is cut and ends in "..." (the format's own text kept where it fits)."""

        def enc(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        limit = self.cfg.max_result_tokens
        ids = enc(self.format_result(result))
        if len(ids) <= limit:
            return ids
        budget = max(1, limit - len(enc(self.format_result("..."))))
        cut = tokenizer.decode(enc(result)[:budget]) + "..."
        return enc(self.format_result(cut))[:limit]

    def limit_text(self) -> str:
        return f"error: at most {self.cfg.max_calls} tool calls per completion"

    def result_spans(self, text: str) -> list[tuple[int, int]]:
        """Character spans of tool results in a finished text (training data that holds calls):
        the tokens there were inserted by a tool, not written by the model."""
        return [(m.start(2 if self.cfg.format == "tag" else 1), m.end()) for m in self._result.finditer(text)]  # fmt: skip


class ToolRunner:
    """Per-row tool state of one decoding batch: finds a call a row has just closed, runs it and
    queues the result's tokens, which the row then reads one per step instead of sampling."""

    def __init__(self, toolbox: Toolbox, tokenizer: Any, B: int):
        self.toolbox = toolbox
        self.tokenizer = tokenizer
        self.queue: list[list[int]] = [[] for _ in range(B)]  # result tokens still to feed
        self.calls: list[list[ToolCall]] = [[] for _ in range(B)]
        self.scan_from = [0] * B  # where in the row's tokens the search for the next call starts
        self._closing: dict[int, bool] = {}  # token id -> its text holds a closer's last character

    def may_close(self, token: int) -> bool:
        if token not in self._closing:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            self._closing[token] = any(c in text for c in self.toolbox.last_chars)
        return self._closing[token]

    def after_sampled(self, i: int, history: list[int]) -> None:
        """Row i has just sampled history[-1]: run the call it closed, if any."""
        if not self.may_close(history[-1]):
            return
        text = self.tokenizer.decode(history[self.scan_from[i] :], skip_special_tokens=False)
        found = self.toolbox.find_call(text)
        if found is None:
            return
        name, args, _ = found
        if len(self.calls[i]) >= self.toolbox.cfg.max_calls:
            call = ToolCall(name or "?", args.strip(), self.toolbox.limit_text(), error=True)
        else:
            call = self.toolbox.run(name, args)
        self.calls[i].append(call)
        self.queue[i] = self.toolbox.result_ids(self.tokenizer, call.result)
        self.scan_from[i] = len(history) + len(self.queue[i])


def calls_in(text: str, toolbox: Toolbox) -> list[ToolCall]:
    """The calls a finished text holds, each with the result text that follows it (reports)."""
    starts = dict(toolbox.result_spans(text))
    out = []
    for m in toolbox._call.finditer(text):
        name = m.group(1) if toolbox.cfg.format == "tag" else ""
        end = starts.get(m.end())
        result = text[m.end() : end].strip() if end is not None else ""
        if toolbox.cfg.format == "tag":
            result = result.removeprefix("=").strip()
        else:
            result = result.removeprefix("<tool_response>").removesuffix("</tool_response>").strip()
        out.append(
            ToolCall(
                name,
                m.group(2 if toolbox.cfg.format == "tag" else 1).strip(),
                result,
                result.startswith("error:"),
            )
        )
    return out
