"""How long `snnet serve` takes to be ready, with the model process spawned before the server's
own imports (``server.early``, the default) against spawned once the weights are loaded (as
before), side by side in one run.

    python bench/startup.py [--starts 3] [--weights DIR]

Both run ``server.cli.main(["serve", ...])`` in a fresh interpreter; the peer has the early
start switched off (``server.cli._start_model_process_early`` replaced by a no-op). One start
fills a profile cache first, so every timed start is a restart (calibration; nothing more is
measured: ``SNNET_PROFILE_SECONDS=0`` unless set);
then the two alternate, ``--starts`` each, the order swapped every round. Prints, per start,
the seconds from launch to the "ready in" log line and what the log says the model process took
from its spawn (or, early, from the hand-over of the weights) to ready; then the medians. Ends
with one JSON line: ``{"early_ready_s", "late_ready_s", "ratio", "early_model_process_s",
"late_model_process_s", "early_used", "starts"}`` (medians; ratio = early / late; early_used:
how many early starts kept their early process, the others measured another thread count than
the one remembered and spawned a new one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = "import server.cli as c; c._start_model_process_early = lambda: None\n"


def start(early: bool, env: dict[str, str]) -> tuple[float, float, bool]:
    """(seconds from launch to ready, the model process's own figure, whether the process
    started early served) for one start."""
    port = free_port()
    code = ("" if early else PEER) + (
        "import sys, server.cli as c\n"
        f"sys.exit(c.main(['serve', '--port', '{port}', '--host', '127.0.0.1']))"
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=env, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    model_s, used = None, False
    try:
        for line in proc.stderr:
            m = re.search(r"model process \d+ ready \(([\d.]+)s", line)
            if m:
                model_s = float(m.group(1))
                used = "started early" in line
            if "ready in" in line:
                ready_s = time.perf_counter() - t0
                break
            if "Traceback" in line or "error:" in line:
                raise SystemExit(f"server failed to start: {line}")
        else:
            raise SystemExit("server exited before it was ready")
    finally:
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        proc.terminate()
        proc.wait(60)
    if model_s is None:
        raise SystemExit("no model process in the log: is SNNET_WORKER=process (a CPU model)?")
    return ready_s, model_s, used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--weights", help="checkpoint directory (default: the bundled weights)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = {
        **os.environ, "SNNET_PROFILE_CACHE": str(tmp / "profiles.json"), "SNNET_GRPC_PORT": "0",
        "XDG_CACHE_HOME": str(tmp / "cache"),  # the thread count remembered: this run's own
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }  # fmt: skip
    if args.weights:
        env["SNNET_WEIGHTS"] = args.weights
    print("filling the profile cache (and the thread count remembered) with one start ...")
    start(True, env)
    # Every timed start then does the same work: what the cache lacks (a 71-stitch net's
    # stitches beyond SNNET_PROFILE_SECONDS) stays estimated instead of being measured by
    # whichever start comes first.
    env.setdefault("SNNET_PROFILE_SECONDS", "0")
    runs: dict[bool, list[tuple[float, float, bool]]] = {True: [], False: []}
    for i in range(args.starts):
        for early in (True, False) if i % 2 == 0 else (False, True):
            ready_s, model_s, used = start(early, env)
            runs[early].append((ready_s, model_s, used))
            name = "early" if early else "late "
            note = (
                " (the early process had other OpenMP settings: replaced)" if early > used else ""
            )
            print(f"round {i + 1} {name}: ready {ready_s:5.2f} s after launch; "
                  f"model process {model_s:4.2f} s{note}")  # fmt: skip
    med = {k: [statistics.median(x[j] for x in v) for j in (0, 1)] for k, v in runs.items()}
    print(f"median ready: early {med[True][0]:.2f} s, late {med[False][0]:.2f} s "
          f"(x{med[True][0] / med[False][0]:.2f}); model process {med[True][1]:.2f} s against "
          f"{med[False][1]:.2f} s")  # fmt: skip
    print(json.dumps({
        "early_ready_s": round(med[True][0], 2), "late_ready_s": round(med[False][0], 2),
        "ratio": round(med[True][0] / med[False][0], 3),
        "early_model_process_s": round(med[True][1], 2),
        "late_model_process_s": round(med[False][1], 2),
        "early_used": sum(x[2] for x in runs[True]), "starts": args.starts,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
