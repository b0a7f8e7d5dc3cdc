"""One client sending requests one after another: how often does it get the most accurate stitch?

    python bench/sequential.py [--requests 150] [--images 8] [--budget-ms 1000] [--weights DIR]

Starts `snnet serve` on the bundled weights (default) and sends ``--requests`` requests of
``--images`` held-out digits back to back, each with the same generous budget, as a script or a
batch job would. Nobody waits behind anybody, so every answer should come from the most accurate
stitch. Prints the share that did, the stitches that answered, latency medians, the controller's
load level at the end, and one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--budget-ms", type=float, default=1000.0)
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args()
    proc, url = start_server({"SNNET_WEIGHTS": args.weights})
    pngs = digit_pngs()
    try:
        c = Client(url)
        menu = c.get("/stitches")["stitches"]
        best = max(menu, key=lambda s: (s["accuracy"], -s["gflops"]))["id"]
        stitches, total, levels = collections.Counter(), [], []
        for i in range(args.requests):
            body = [pngs[(i * args.images + k) % len(pngs)] for k in range(args.images)]
            t0 = time.perf_counter()
            status, answer = c.classify(body, latency_budget_ms=args.budget_ms)
            total.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise SystemExit(f"request {i}: status {status}: {answer}")
            stitches[answer["stitch"]["id"]] += 1
            if i % 10 == 9:
                levels.append(c.get("/controller")["load_level"])
        c.close()
    finally:
        proc.terminate()
        proc.wait(30)
    share = stitches[best] / args.requests
    print(
        f"# one sequential client, {args.requests} requests of {args.images} images, "
        f"latency_budget_ms={args.budget_ms:g}, {Path(args.weights).name}"
    )
    print(f"most accurate stitch ({best}): {stitches[best]}/{args.requests} = {share:.1%}")
    print(f"stitches that answered: {dict(stitches.most_common())}")
    print(f"round trip median {statistics.median(total):.1f} ms, max {max(total):.1f} ms")
    print(f"controller load level every 10 requests: max {max(levels):.2f}")
    print(
        json.dumps(
            {
                "best_share": round(share, 4),
                "best_stitch": best,
                "stitches": dict(stitches),
                "rtt_median_ms": round(statistics.median(total), 3),
                "rtt_max_ms": round(max(total), 3),
                "max_load_level": max(levels),
            }
        )
    )


if __name__ == "__main__":
    main()
