"""Demo traffic for the dashboard: open-loop classify requests with a mix of latency budgets.

docker-compose.yml runs it against the service (until stopped); the live Prometheus test runs it
with a bounded count. Standard library and Pillow only, so it runs in the service's image.

    python deploy/loadgen.py --url http://127.0.0.1:8000 --rate 20 --requests 200
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, ImageDraw

# Budgets in ms (None: the server's default). 0.01 ms is below any stitch's compute time: 422.
BUDGETS = [None, 1000, 200, 50, 20, 10, 5, 0.01]


def digit_png(d: int) -> bytes:
    img = Image.new("L", (28, 28))
    ImageDraw.Draw(img).text((10, 8), str(d), fill=255)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def classify(url: str, png: bytes, budget: float | None, timeout: float) -> int:
    body = {"images": [base64.b64encode(png).decode()]}
    if budget is not None:
        body["latency_budget_ms"] = budget
    req = urllib.request.Request(
        f"{url}/classify",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # connection refused or timed out


def main(argv: list[str] | None = None) -> dict[int, int]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--rate", type=float, default=20, help="requests per second")
    p.add_argument("--requests", type=int, default=0, help="stop after this many (0: no limit)")
    p.add_argument("--duration", type=float, default=60, help="stop after seconds (0: no limit)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    pngs = [digit_png(d) for d in range(10)]
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def one(png: bytes, budget: float | None) -> None:
        status = classify(args.url, png, budget, timeout=30)
        with lock:
            statuses[status] += 1

    start = time.monotonic()
    sent = 0
    # Open loop: requests leave on schedule whether or not earlier ones were answered.
    with ThreadPoolExecutor(max_workers=32) as pool:
        while (not args.requests or sent < args.requests) and (
            not args.duration or time.monotonic() - start < args.duration
        ):
            pool.submit(one, rng.choice(pngs), rng.choice(BUDGETS))
            sent += 1
            if sent % max(1, round(10 * args.rate)) == 0:  # about every 10 s: compose runs forever
                with lock:
                    print(
                        f"sent {sent}; statuses so far:", dict(sorted(statuses.items())), flush=True
                    )
            time.sleep(max(0.0, start + sent / args.rate - time.monotonic()))
    print("statuses:", dict(sorted(statuses.items())), flush=True)
    return dict(statuses)


if __name__ == "__main__":
    main()
