"""Closed loop: 8 concurrent clients with mixed latency budgets against `snnet serve`.

    python bench/closed_loop.py [--clients 8] [--seconds 30] [--budgets 2x,4x,8x,16x] [--weights DIR]

Each client sends single-image requests back to back, each with a budget drawn from the mix (a
value ending in ``x`` is a multiple of the most accurate stitch's profiled time at batch 1).
Prints the share of answered requests within their budget (client-measured; target >= 99%),
throughput, status counts and how often each stitch answered.
"""

from __future__ import annotations

import argparse
import collections
import gc
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--budgets", default="2x,4x,8x,16x", help="ms or multiples, drawn uniformly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", help="checkpoint to serve (default: the bundled weights/)")
    ap.add_argument(
        "--network-ms",
        type=float,
        default=0.0,
        help="SNNET_NETWORK_MS for the server: budget reserved for time outside its view",
    )
    args = ap.parse_args()
    env = {"SNNET_NETWORK_MS": str(args.network_ms)}
    if args.weights:
        env["SNNET_WEIGHTS"] = args.weights
    proc, url = start_server(env)
    c = Client(url)
    menu = c.get("/stitches")["stitches"]
    c.close()
    best = max(menu, key=lambda r: (r["accuracy"] or 0, r["gflops"]))
    unit = best["predicted_ms"]["1"]
    budgets = [
        round(float(b[:-1]) * unit, 2) if b.endswith("x") else float(b)
        for b in args.budgets.split(",")
    ]
    pngs = digit_pngs()
    records: list[tuple[float, float, int, int | None]] = []  # budget, rtt ms, status, stitch
    outside: list[float] = []  # client round trip minus the server's own total, ms
    lock = threading.Lock()
    # This client imports torch too: keep full collections (~200 ms) out of its measurements.
    gc.collect()
    gc.freeze()
    stop_at = time.monotonic() + args.seconds

    def client(k: int) -> None:
        rng = random.Random(args.seed * 100 + k)
        c = Client(url)
        while time.monotonic() < stop_at:
            budget = rng.choice(budgets)
            t0 = time.perf_counter()
            status, body = c.classify(rng.choice(pngs), latency_budget_ms=budget)
            ms = (time.perf_counter() - t0) * 1e3
            stitch = body["stitch"]["id"] if status == 200 else None
            with lock:
                records.append((budget, ms, status, stitch))
                if status == 200:
                    outside.append(ms - body["timing"]["total_ms"])
        c.close()

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        state: dict = {}
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        c = Client(url)
        state = c.get("/controller")
        c.close()
    finally:
        proc.terminate()
        proc.wait(30)
    ok = [r for r in records if r[2] == 200]
    within = sum(1 for b, ms, _, _ in ok if ms <= b)
    print(
        f"# {args.clients} clients, {args.seconds:g} s, budgets {budgets} ms (uniform), "
        f"SNNET_NETWORK_MS={args.network_ms:g}"
    )
    print(
        f"requests {len(records)}, answered {len(ok)}, statuses {dict(collections.Counter(r[2] for r in records))}"
    )
    print(
        f"within budget (client-measured): {within}/{len(ok)} = {100 * within / max(1, len(ok)):.2f}% of answered (target >= 99%)"
    )
    print(
        f"throughput {len(ok) / elapsed:.1f} answered/s; latency median {statistics.median(r[1] for r in ok):.2f} ms"
    )
    out = sorted(outside)
    print(
        f"outside the server's view (client round trip - server total): median "
        f"{out[len(out) // 2]:.2f} ms, p95 {out[int(0.95 * len(out))]:.2f} ms, p99 "
        f"{out[int(0.99 * len(out))]:.2f} ms"
    )
    for b in budgets:
        sub = [r for r in ok if r[0] == b]
        if sub:
            print(
                f"  budget {b:>5g} ms: {len(sub)} answered, {100 * sum(r[1] <= b for r in sub) / len(sub):.2f}% within, "
                f"median {statistics.median(r[1] for r in sub):.2f} ms"
            )
    print(
        f"controller at the end: margin {state.get('margin')}, load level "
        f"{state.get('load_level')}, arrival rate {state.get('arrival_rate')}/s"
    )
    usage = collections.Counter(r[3] for r in ok)
    print("stitch usage: " + ", ".join(f"{s}:{n}" for s, n in sorted(usage.items())))


if __name__ == "__main__":
    main()
