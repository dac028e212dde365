"""Fixtures shared by the smoke tests."""

from __future__ import annotations

import pytest
from browser import Browser, find_chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless chromium (tests/smoke/browser.py), one per test module; skips without one."""
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "chromium not found: the report's browser check needs it "
            "(`apt-get install chromium` as root; `make test` does this), or set CHROMIUM=/path"
        )
    tmp = tmp_path_factory.mktemp("chromium")
    b = Browser(exe, tmp / "profile", tmp / "chromium.log")
    yield b
    b.close()
