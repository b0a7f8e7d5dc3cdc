"""Server overhead at batch 1 against the framework's floor, side by side in one run.

    python bench/server_overhead.py [--requests 300] [--stitch 2] [--rounds 5]

Starts `snnet serve` on the bundled weights and a bare FastAPI app on the same uvicorn
(``bench/_bare.py``: its POST route only reads the body and answers a small JSON), and drives
both with the same sequential keep-alive ``http.client`` loop and the same 28x28 PNG digits as
multipart, in alternating rounds. Prints medians of: our round trip, the server-reported compute
(which includes the hop to the model process), our overhead (round trip - compute, per request:
HTTP, parsing, decoding, planning, queueing, answering), the bare app's round trip, and their
ratio (target: <= 1.5). Ends with one JSON line: ``{"overhead_ms", "bare_ms", "ratio", ...}``.

The bare app above answers back to back and never waits. Ours waits for the model between
reading a request and answering it, and on a VM a process that has waited a few milliseconds
runs its next steps several times slower (caches, the hypervisor). So each round also drives the
bare app "paced": its route first idles (``asyncio.sleep``) as long as our median compute of the
round, and its overhead is its round trip less that pause. ``paced_ms`` is that floor and
``ratio_paced`` our overhead against it: what is left is our own work.
A third server in the same rounds is the plain timm server of `bench/peer.py` (``bench/_plain.py``:
FastAPI, a sync route, PIL decode, timm's transform, the same checkpoint's most accurate anchor):
what a user writes without SN-Net. Its overhead is its round trip less its forward
(``plain_ms``), and ``ratio_plain`` is ours against it: whether our path costs more than the
plainest server that runs a model at all.
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


def start_plain(weights: str) -> tuple[subprocess.Popen, str]:
    return start_script([str(HERE / "_plain.py"), weights], "/healthz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=300, help="per server, over all rounds")
    ap.add_argument("--stitch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--weights", default=str(HERE.parent / "weights"), help="checkpoint directory")
    args = ap.parse_args()
    pngs = digit_pngs()
    rtt, compute, overhead, floor, paced, plain_over = [], [], [], [], [], []
    per_round = max(1, args.requests // args.rounds)
    started: list[subprocess.Popen] = []  # all stopped at the end, also if a later start fails
    try:
        urls = []
        for start in (
            lambda: start_server({"SNNET_WEIGHTS": args.weights}), start_bare,
            lambda: start_plain(args.weights),
        ):  # fmt: skip
            proc, u = start()
            started.append(proc)
            urls.append(u)
        url, bare_url, plain_url = urls
        client, peer, plainc = Client(url), Client(bare_url), Client(plain_url)
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
            served = []
            for i in range(per_round):
                t0 = time.perf_counter()
                status, body = client.classify(pngs[i % len(pngs)], stitch_id=args.stitch)
                ms = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    raise SystemExit(f"status {status}: {body}")
                served.append(body["timing"]["compute_ms"])
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
            pause = f"pause_ms={statistics.median(served):.3f}"
            for i in range(per_round):
                t0 = time.perf_counter()
                status, body = peer.classify(pngs[i % len(pngs)], query=pause)
                ms = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    raise SystemExit(f"bare app (paced): status {status}")
                if r:
                    paced.append(ms - body["timing"]["compute_ms"])
            for i in range(per_round):
                t0 = time.perf_counter()
                status, body = plainc.classify(pngs[i % len(pngs)])
                ms = (time.perf_counter() - t0) * 1e3
                if status != 200:
                    raise SystemExit(f"plain server: status {status}: {body}")
                if r:
                    plain_over.append(ms - body["timing"]["compute_ms"])
        client.close()
        peer.close()
        plainc.close()
    finally:
        for p in started:
            p.terminate()
            p.wait(30)
    med = statistics.median
    p90 = sorted(overhead)[int(0.9 * len(overhead))]
    ratio = med(overhead) / med(floor)
    ratio_paced = med(overhead) / med(paced)
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
    print(f"bare FastAPI, paced           median {med(paced):7.3f} ms   (round trip less a pause "
          f"of our median compute, {statistics.median(compute):.1f} ms)")  # fmt: skip
    print(f"ratio overhead / paced bare   {ratio_paced:7.2f}")
    print(f"plain timm server, overhead   median {med(plain_over):7.3f} ms   (round trip less its "
          f"forward: FastAPI sync route, PIL, timm transform)")  # fmt: skip
    print(f"ratio overhead / plain        {med(overhead) / med(plain_over):7.2f}")
    print(json.dumps({"overhead_ms": round(med(overhead), 3), "bare_ms": round(med(floor), 3),
                      "ratio": round(ratio, 2), "paced_ms": round(med(paced), 3),
                      "ratio_paced": round(ratio_paced, 2), "plain_ms": round(med(plain_over), 3),
                      "ratio_plain": round(med(overhead) / med(plain_over), 2), "rtt_ms": round(med(rtt), 3),
                      "compute_ms": round(med(compute), 3), "overhead_p90_ms": round(p90, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
