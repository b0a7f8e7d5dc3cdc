"""Model in a worker thread vs a child process (``SNNET_WORKER``), side by side.

    python bench/worker.py [--weights weights] [--clients 4] [--seconds 5]

Starts `snnet serve` once per worker kind and, for the cheapest and the most accurate stitch
(``policy`` field), has ``--clients`` connections send 8-image requests back to back. Prints the
answered requests/s and the median batch time the server reports (``timing.compute_ms``); the
profiled time of the same batch is printed for reference. On CPU a thread that runs the model
must win the GIL back from the event loop after every torch op; a child process need not.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def run(url: str, policy: str, pngs: list[bytes], clients: int, seconds: float):
    compute: list[float] = []
    lock = threading.Lock()
    t_start = time.monotonic() + 0.5  # half a second of warm-up, not counted
    t_end = t_start + seconds

    def client() -> None:
        c = Client(url)
        while (now := time.monotonic()) < t_end:
            status, body = c.classify(pngs, latency_budget_ms=60_000, policy=policy)
            if status == 200 and now >= t_start:
                with lock:
                    compute.append(body["timing"]["compute_ms"])
        c.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(compute) / seconds, statistics.median(compute)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    pngs = digit_pngs(8)
    gc.collect()
    gc.freeze()
    rows = []
    for kind in ("thread", "process"):
        proc, url = start_server(
            {"SNNET_WEIGHTS": args.weights, "SNNET_WORKER": kind, "SNNET_BASELINE_POLICIES": "true"}
        )
        try:
            c = Client(url)
            menu = c.get("/stitches")["stitches"]
            c.close()
            for policy in ("cheapest", "most_accurate"):
                if policy == "cheapest":
                    row = min(menu, key=lambda r: r["predicted_ms"]["8"])
                else:
                    row = max(menu, key=lambda r: (r["accuracy"] or 0, r["gflops"]))
                rps, ms = run(url, policy, pngs, args.clients, args.seconds)
                rows.append((kind, policy, row["id"], rps, ms, row["latency_ms"]["8"]))
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"# {args.clients} clients, 8 images per request, {args.seconds:g} s per row")
    print(f"{'worker':8} {'policy':14} {'stitch':>6} {'req/s':>8} {'batch ms':>9} {'profiled':>9}")
    for kind, policy, sid, rps, ms, prof in rows:
        print(f"{kind:8} {policy:14} {sid:>6} {rps:8.1f} {ms:9.2f} {prof:9.2f}")
    by = {(k, p): (rps, ms) for k, p, _, rps, ms, _ in rows}
    for policy in ("cheapest", "most_accurate"):
        t, p = by[("thread", policy)], by[("process", policy)]
        print(
            f"{policy}: process/thread throughput {p[0] / t[0]:.2f}x, batch time {p[1] / t[1]:.2f}x"
        )


if __name__ == "__main__":
    main()
