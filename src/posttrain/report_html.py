"""HTML building blocks of `posttrain report` and `posttrain compare`: escaping, cell formatting,
tables, images embedded as base64 data URIs, and the self-contained page with its CSS.

Every value goes through `fmt`, which escapes it (model output shows as text, never as markup);
only `Html` values, built here from escaped parts, pass as they are.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_TEXT = 3000  # characters of a prompt or completion shown


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-family: monospace; }
td.text { white-space: pre-wrap; max-width: 560px; font-family: monospace; font-size: 0.85em; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 0.85em; }
img { display: block; max-width: 100%; margin: 8px 0; border: 1px solid #eee; }
.muted { color: #777; } .up { color: #1a7f37; } .down { color: #b42318; }
table.tools { margin: 0; font-size: 0.95em; } table.tools td.result { background: #eef6ff; }
"""


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


class Html(str):
    """Markup built here from escaped parts (a nested table): a cell shows it as is."""


def fmt(v: Any) -> str:
    """A cell value as escaped text: numbers to 4 significant digits, long text cut."""
    if isinstance(v, Html):
        return str(v)
    if v is None:
        return '<span class="muted">-</span>'
    if isinstance(v, bool):
        return esc(v)
    if isinstance(v, float):
        return esc(f"{v:.4g}")
    if isinstance(v, dict | list):
        v = json.dumps(v)
    s = str(v)
    if len(s) > MAX_TEXT:
        s = s[:MAX_TEXT] + f" ... [{len(s) - MAX_TEXT} more characters]"
    return esc(s)


def _cell(v: Any) -> str:
    cls = "num" if isinstance(v, int | float) and not isinstance(v, bool) else "text"
    return f'<td class="{cls}">{fmt(v)}</td>'


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(Path(path).stem)}" src="data:image/png;base64,{data}">'


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'  # no favicon request
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
