"""A co-tenant for tests: a busy loop in a process of its own, pinned to one CPU."""

from __future__ import annotations

import contextlib
import subprocess
import sys

# Spins until its parent goes or a minute passes (a test killed midway leaves nothing spinning).
_LOOP = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
parent, until = os.getppid(), time.monotonic() + 60
print(flush=True)
while time.monotonic() < until and os.getppid() == parent:
    pass
"""


@contextlib.contextmanager
def busy_loop_on(cpu: int):
    """Run a busy loop on ``cpu`` for the ``with`` block (spinning once the block starts)."""
    with subprocess.Popen([sys.executable, "-c", _LOOP, str(cpu)], stdout=subprocess.PIPE) as hog:
        try:
            hog.stdout.readline()  # pinned, and spinning from here on
            yield
        finally:
            hog.kill()
