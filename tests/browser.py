"""Headless chromium for the report tests: open an HTML file, collect what went wrong.

The browser is Debian's chromium (`make test` installs it when run as root), driven over the
DevTools protocol on a pipe: no extra Python package, no port to pick. `Browser.check(path)`
returns the page facts (title, images, broken images, fetched URLs, scripts, text) and `errors`:
everything logged at error level (console, uncaught exceptions, failed loads). `assert_clean`
is the check every report page must pass. The `browser` fixture (tests/conftest.py) starts
one per test module.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# what the page shows, evaluated in it after the load event
PAGE_FACTS = """(() => {
  const imgs = [...document.images];
  return {
    title: document.title,
    images: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src),
    fetched: performance.getEntriesByType('resource').map(e => e.name),
    links: [...document.querySelectorAll('[src],[href]')]
      .map(e => e.getAttribute('src') || e.getAttribute('href')),
    scripts: document.scripts.length,
    text: document.body.innerText,
  };
})()"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """Chromium with --remote-debugging-pipe: it reads commands on fd 3 and writes replies and
    events on fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, exe: str, profile: Path, log: Path):
        to_chrome, self._w = os.pipe()
        self._r, from_chrome = os.pipe()
        # the pipe ends come in as the shell's stdin/stdout, which it moves to fds 3 and 4
        script = 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2'
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", script, exe, *FLAGS, f"--user-data-dir={profile}"]
                + ["--remote-debugging-pipe", "about:blank"],
                stdin=to_chrome,
                stdout=from_chrome,
                stderr=err,
            )
        os.close(to_chrome)
        os.close(from_chrome)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._r], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"chromium did not answer; its log:\n{self.log.read_text()}")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe; its log:\n{self.log.read_text()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        msg: dict = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60  # a cold start on a busy machine
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for e in self.events[seen:]:
                if e.get("method") == method and e.get("sessionId") == session:
                    return e
            seen = len(self.events)
            self.events.append(self._next(deadline))

    def check(self, path: Path) -> dict:
        """Open a file; return the page facts plus `errors`: everything logged at error level."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = session["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        nav = self.send("Page.navigate", {"url": path.resolve().as_uri()}, session)
        assert "errorText" not in nav, nav
        self.wait_for("Page.loadEventFired", session)
        facts = self.send(
            "Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True}, session
        )["result"]["value"]
        errors = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                errors.append(p["exceptionDetails"].get("text", "exception"))
            elif e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a)) for a in p["args"]))
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] == "error":
                errors.append(f"{p['entry']['text']} {p['entry'].get('url', '')}".strip())
        self.send("Target.closeTarget", {"targetId": target})
        return {**facts, "errors": errors}

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._r)
        os.close(self._w)


def assert_clean(facts: dict, images: int) -> None:
    assert facts["errors"] == [], facts["errors"]
    assert facts["broken"] == [], facts["broken"]
    assert facts["images"] == images
    assert all(u.startswith("data:") for u in facts["fetched"] + facts["links"]), facts
    assert facts["scripts"] == 0  # the report needs none, and model output must not become one
