"""Headless Chromium for the browser tests: Debian's `chromium` (no browser download), driven by
Playwright, with every request not to the server under test aborted (an offline cluster)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest


def chromium() -> str:
    """The system Chromium's path; a failure under CI (`.ci/run` installs it), else a skip."""
    path = shutil.which("chromium")
    if not path:
        msg = "chromium not found (Debian package `chromium`; .ci/run installs it)"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    return path


def only(url: str, blocked: list[str]) -> Callable:
    """A Playwright route handler: requests to ``url`` go through, the rest are aborted and
    their URLs appended to ``blocked``."""

    def route(r) -> None:
        if r.request.url.startswith(url):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    return route
