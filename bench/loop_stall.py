"""How long a large request holds the server's event loop: a second client's pings while one
client sends multi-megabyte JSON requests, against the same pings at idle.

    python bench/loop_stall.py [--requests 20] [--images 4] [--side 1000]

Starts `snnet serve` on the bundled weights. A pinger sends `GET /healthz` back to back on its own
keep-alive connection throughout; first alone for 2 s (the idle reference), then while another
connection sends ``--requests`` V2 JSON requests, each ``--images`` noise PNGs of ``--side`` x
``--side`` pixels base64-encoded (about 3 MB of JSON apiece at the defaults), pinned to stitch 0
so the model's share stays small. A request parsed on the event loop shows as pings that wait
for it; parsed in a worker thread, the pings barely move. Prints the pings' median, p99 and
worst per phase and the large requests' median round trip; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start_server  # noqa: E402


def noise_png(side: int, seed: int) -> bytes:
    gen = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(gen.integers(0, 255, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--side", type=int, default=1000)
    args = ap.parse_args()
    proc, url = start_server()
    u = urlparse(url)
    phase, pings = ["idle"], {"idle": [], "busy": []}
    stop = threading.Event()

    def pinger() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while not stop.is_set():
            t0 = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            pings[phase[0]].append((time.perf_counter() - t0) * 1e3)
            time.sleep(0.001)  # (a client's pace, not a spin that takes a core)

    images = [base64.b64encode(noise_png(args.side, i)).decode() for i in range(args.images)]
    body = json.dumps(
        {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": images}]}
    )
    rtts = []
    try:
        thread = threading.Thread(target=pinger, daemon=True)
        thread.start()
        time.sleep(2.0)
        phase[0] = "busy"
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            conn.request("POST", "/v2/models/weights/versions/0/infer", body,
                         {"Content-Type": "application/json"})  # fmt: skip
            r = conn.getresponse()
            r.read()
            assert r.status == 200, r.status
            rtts.append((time.perf_counter() - t0) * 1e3)
        stop.set()
        thread.join(10)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"# {args.requests} V2 JSON requests of {len(body) / 1e6:.1f} MB ({args.images} PNGs "
          f"{args.side}x{args.side}); /healthz pings on another connection")  # fmt: skip
    out = {"body_mb": round(len(body) / 1e6, 2), "request_ms": round(statistics.median(rtts), 2)}
    for name, xs in pings.items():
        p50, p99, top = statistics.median(xs), pct(xs, 0.99), max(xs)
        print(f"pings {name:4s}: {len(xs):5d}, median {p50:6.2f} ms, p99 {p99:6.2f} ms, "
              f"worst {top:6.2f} ms")  # fmt: skip
        out |= {f"{name}_p50_ms": round(p50, 3), f"{name}_p99_ms": round(p99, 3),
                f"{name}_max_ms": round(top, 3)}  # fmt: skip
    print(f"large request round trip: median {out['request_ms']:.1f} ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
