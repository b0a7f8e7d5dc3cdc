"""The model process kept on its own CPU, apart from the HTTP front end, against today's floating
placement, side by side, when the model has one CPU fewer than the machine (the bundled model on
2 CPUs: 1 model thread).

    python bench/placement.py [--rounds 2] [--seconds 2]

``server.runner`` binds the model's threads only when they take every CPU; with one CPU left to
the front end they float, so the scheduler may move the model's thread to the CPU the front end
(and here the load generator) just ran on. Each round starts `snnet serve` twice, in turn:
**float** (as served today) and **apart** (this script pins every thread of the model process to
CPU 0, and the server's and its own to the others). Four back-to-back clients then measure the
end-to-end capacity of the cheapest and of the most accurate stitch (explicit ``stitch_id``),
single-image and 8-image requests, in alternating windows, and the server's mean batch time
(``snnet_compute_seconds``: from hand-off to answer).

Ends with one JSON line: per placement the medians over its windows (requests/s, ms a batch) and
the realised range (cheapest / most accurate), and apart / float for each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import digit_pngs, start_server  # noqa: E402
from load import batches_run, measure_capacity  # noqa: E402


def threads_of(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def set_cpus(threads: list[int], cpus: set[int]) -> None:
    for t in threads:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            os.sched_setaffinity(t, cpus)


def pin_apart(server_pid: int) -> None:
    """Every thread of the model process on CPU 0; the server's and this script's on the rest."""
    cpus = sorted(os.sched_getaffinity(0))
    kids = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    (model,) = [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
    set_cpus(threads_of(model), {cpus[0]})
    set_cpus(threads_of(server_pid) + threads_of(os.getpid()), set(cpus[1:]))


def measure(placement: str, seconds: float, pngs: list[bytes]) -> dict[str, list[float]]:
    proc, url = start_server({"SNNET_THREADS": str(len(os.sched_getaffinity(0)) - 1)})
    before = os.sched_getaffinity(0)
    try:
        if placement == "apart":
            pin_apart(proc.pid)
        menu = json.loads(urllib.request.urlopen(url + "/stitches", timeout=30).read())
        rows = menu["stitches"]
        cheap = min(rows, key=lambda r: r["gflops"])
        best = max(rows, key=lambda r: (r["accuracy"] or 0, r["gflops"]))
        out: dict[str, list[float]] = {}
        for images in (1, 8):
            for k in range(2):
                for name, r in (("cheapest", cheap), ("most_accurate", best))[:: 1 - 2 * k]:
                    # (one stitch runs in the window: its batches are all the batches)
                    n0, _, s0 = batches_run(url, r["id"])
                    rps = measure_capacity(
                        url, pngs, images, seconds=seconds, warmup_s=0.3, stitch_id=r["id"]
                    )
                    n1, _, s1 = batches_run(url, r["id"])
                    out.setdefault(f"{name}_rps_{images}", []).append(rps)
                    out.setdefault(f"{name}_batch_ms_{images}", []).append(
                        1e3 * (s1 - s0) / max(1.0, n1 - n0)
                    )
        return out
    finally:
        set_cpus(threads_of(os.getpid()), before)
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs at least 2 CPUs")
    pngs = digit_pngs(32)
    seen: dict[str, dict[str, list[float]]] = {"float": {}, "apart": {}}
    for k in range(args.rounds):
        for placement in ("float", "apart") if k % 2 == 0 else ("apart", "float"):
            got = measure(placement, args.seconds, pngs)
            for key, values in got.items():
                seen[placement].setdefault(key, []).extend(values)
            print(placement, {key: [round(v, 2) for v in vs] for key, vs in got.items()},
                  file=sys.stderr)  # fmt: skip
    summary: dict[str, dict[str, float]] = {}
    for placement, figures in seen.items():
        med = {key: round(statistics.median(vs), 2) for key, vs in figures.items()}
        for images in (1, 8):
            med[f"realised_{images}"] = round(
                med[f"cheapest_rps_{images}"] / med[f"most_accurate_rps_{images}"], 2
            )
        summary[placement] = med
    summary["apart_over_float"] = {
        key: round(summary["apart"][key] / summary["float"][key], 2)
        for key in summary["float"]
        if summary["float"][key]
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
