"""Server overhead at batch 1: end-to-end HTTP time minus the model's compute time, one run.

    python bench/server_overhead.py [--requests 300] [--stitch 2]

Starts `snnet serve` on the bundled weights, sends sequential single-image requests for one
stitch, and prints medians of: client round trip, server-reported compute, their difference per
request (the overhead: HTTP, parsing, decoding, queueing), and, for reference, the same stitch's
forward timed in this process. Target: overhead median <= 3 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402

import snnet_core  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--stitch", type=int, default=2)
    args = ap.parse_args()
    proc, url = start_server()
    pngs = digit_pngs()
    rtt, compute, overhead = [], [], []
    try:
        client = Client(url)
        for i in range(args.requests + 20):
            t0 = time.perf_counter()
            status, body = client.classify(pngs[i % len(pngs)], stitch_id=args.stitch)
            ms = (time.perf_counter() - t0) * 1e3
            if status != 200:
                raise SystemExit(f"status {status}: {body}")
            if i >= 20:  # warm-up
                c = body["timing"]["compute_ms"]
                rtt.append(ms)
                compute.append(c)
                overhead.append(ms - c)
        client.close()
    finally:
        proc.terminate()
        proc.wait(30)
    net, _ = snnet_core.load(ROOT / "weights")
    x = torch.zeros(1, *net.input_size)
    local = []
    with torch.inference_mode():
        for _ in range(args.requests):
            t0 = time.perf_counter()
            net(x, args.stitch)
            local.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median
    print(
        f"# stitch {args.stitch}, batch 1, {args.requests} sequential requests, keep-alive "
        f"http.client; server SNNET_THREADS={os.environ.get('SNNET_THREADS', 'default')}"
    )
    print(f"client round trip      median {med(rtt):7.3f} ms")
    print(f"server compute         median {med(compute):7.3f} ms")
    print(f"in-process forward     median {med(local):7.3f} ms")
    print(
        f"overhead (rtt-compute) median {med(overhead):7.3f} ms   p90 {sorted(overhead)[int(0.9 * len(overhead))]:.3f} ms  (target <= 3 ms)"
    )
    # The server's compute includes handing the batch to the model process and back (on CPU);
    # counting that as overhead too:
    print(f"rtt - in-process fwd   median {med(rtt) - med(local):7.3f} ms")


if __name__ == "__main__":
    main()
