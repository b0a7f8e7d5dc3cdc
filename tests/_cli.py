"""The `snnet` console script in tests: in this process, or as a real subprocess.

``snnet`` calls `server.cli.main`, the function the console script runs, here, with its own
stdout and stderr. A subprocess adds only its imports (torch, timm, torchvision: 5 s each on
the 2-core machine), so it is kept for what is about the process itself (``snnet_process``):
`serve` and its model process, signals, the installed entry point.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

SNNET = str(Path(sys.executable).with_name("snnet"))
ROOT = str(Path(__file__).resolve().parents[1])
# The console script may come from an install of another checkout; run this one's code.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
}


def snnet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`snnet ARGS` in this process: its exit code, stdout and stderr, as a finished process."""
    from server.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's errors
            code = e.code
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"snnet {args} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def snnet_process(
    *args: str, check: bool = True, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`snnet ARGS` as a user runs it: the installed console script, a real subprocess (with
    ``env`` added to its environment)."""
    proc = subprocess.run(
        [SNNET, *args], capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snnet {args} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc
