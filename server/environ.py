"""Starting child processes with settings of their own in their environment.

``multiprocessing`` gives a spawned child this process's environment and no other, so the model
child's OpenMP settings (``server.runner``) are put into ``os.environ`` while it starts and taken
out again. Anything else here that starts a process from a copy of ``os.environ`` (the front
processes, ``server.fronts``) copies it under ``SPAWN_ENV_LOCK``: a front started in that moment
would bind its event loop to one core. A module of its own, light to import: a front process
imports it too.
"""

from __future__ import annotations

import contextlib
import os
import threading

SPAWN_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawning_with(env: dict[str, str]):
    """Set ``env`` (where not already set) in this process's environment while a child is
    spawned: it inherits it; this process's OpenMP runtime read its own long ago."""
    with SPAWN_ENV_LOCK:
        added = {k: v for k, v in env.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


def environ_copy(**extra: str) -> dict[str, str]:
    """A copy of this process's own environment (never a child's settings), with ``extra``."""
    with SPAWN_ENV_LOCK:
        return {**os.environ, **extra}
