"""Server overhead at batch 1 against the framework's floor, side by side in one run.

    python bench/server_overhead.py [--requests 300] [--stitch 2] [--rounds 5]

Starts `snnet serve` on the bundled weights and a bare FastAPI app on the same uvicorn
(``bench/_bare.py``: its POST route only reads the body and answers a small JSON), and drives
both with the same sequential keep-alive ``http.client`` loop and the same 28x28 PNG digits as
multipart, in alternating rounds. Prints medians of: our round trip, the server-reported compute
(which includes the hop to the model process), our overhead (round trip - compute, per request:
HTTP, parsing, decoding, planning, queueing, answering), the bare app's round trip, and their
ratio (target: <= 1.5). Ends with one JSON line: ``{"overhead_ms", "bare_ms", "ratio", ...}``.
With ``SNNET_API_WORKERS`` > 1 in the environment, its client uses a connection a front process
serves (the path through the fronts' hops to the model owner).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_script, start_server  # noqa: E402

HERE = Path(__file__).resolve().parent


def start_bare() -> tuple[subprocess.Popen, str]:
    return start_script([str(HERE / "_bare.py")], "/openapi.json", timeout_s=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300, help="per server, over all rounds")
    ap.add_argument("--stitch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    pngs = digit_pngs()
    ours, url = start_server()
    bare, bare_url = start_bare()
    rtt, compute, overhead, floor = [], [], [], []
    per_round = max(1, args.requests // args.rounds)
    try:
        client, peer = Client(url), Client(bare_url)
        served_by = "the server process"
        if int(os.environ.get("SNNET_API_WORKERS", "1")) > 1:
            # One keep-alive connection stays with one process: take one that a front serves,
            # the path that adds the hops to the model owner.
            for _ in range(100):
                client.classify(pngs[0], stitch_id=args.stitch)
                if client.worker:
                    break
                client.close()
                client = Client(url)
            served_by = f"a front process (pid {client.worker})" if client.worker else "the owner"
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            for i in range(per_round):
                t0 = time.perf_counter()
                status, body = client.classify(pngs[i % len(pngs)], stitch_id=args.stitch)
                ms = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    raise SystemExit(f"status {status}: {body}")
                if r:
                    rtt.append(ms)
                    compute.append(body["timing"]["compute_ms"])
                    overhead.append(ms - body["timing"]["compute_ms"])
            for i in range(per_round):
                t0 = time.perf_counter()
                status, _ = peer.classify(pngs[i % len(pngs)], stitch_id=args.stitch)
                ms = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    raise SystemExit(f"bare app: status {status}")
                if r:
                    floor.append(ms)
        client.close()
        peer.close()
    finally:
        for p in (ours, bare):
            p.terminate()
            p.wait(30)
    med = statistics.median
    p90 = sorted(overhead)[int(0.9 * len(overhead))]
    ratio = med(overhead) / med(floor)
    print(
        f"# stitch {args.stitch}, batch 1, {len(rtt)} sequential requests per server in "
        f"{args.rounds} alternating rounds, keep-alive http.client, one 28x28 PNG as multipart; "
        f"server SNNET_THREADS={os.environ.get('SNNET_THREADS', 'default')}, "
        f"SNNET_API_WORKERS={os.environ.get('SNNET_API_WORKERS', 'default')}: served by {served_by}"
    )
    print(f"snnet serve round trip        median {med(rtt):7.3f} ms")
    print(f"  server compute (with hop)   median {med(compute):7.3f} ms")
    print(f"  overhead (rtt - compute)    median {med(overhead):7.3f} ms   p90 {p90:.3f} ms")
    print(f"bare FastAPI round trip       median {med(floor):7.3f} ms")
    print(f"ratio overhead / bare         {ratio:7.2f}   (target <= 1.5)")
    print(json.dumps({"overhead_ms": round(med(overhead), 3), "bare_ms": round(med(floor), 3),
                      "ratio": round(ratio, 2), "rtt_ms": round(med(rtt), 3),
                      "compute_ms": round(med(compute), 3), "overhead_p90_ms": round(p90, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
