"""The first requests of a fresh server against its next ones: what a client meets right after
`/readyz` (route state built lazily, first-use paths), side by side in one run.

    python bench/first_request.py [--starts 2]

Starts `snnet serve` on the bundled weights ``--starts`` times; each time it sends three
/classify requests then three Open Inference Protocol (V2 REST) inferences, one 28x28 PNG each,
200 ms budget, then the other order on the next start. Prints each request's round trip and
server time less compute (``total_ms - compute_ms``: HTTP, parsing, decoding, planning), and the
medians of the first request of each kind against the later ones. Ends with one JSON line:
``{"first_classify_ms", "later_classify_ms", "first_v2_ms", "later_v2_ms"}`` (server time less
compute, medians).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--starts", type=int, default=2)
    args = ap.parse_args()
    png = digit_pngs()[0]
    v2_body = json.dumps({
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "data": [base64.b64encode(png).decode()]}],
        "parameters": {"latency_budget_ms": 200},
    })  # fmt: skip
    http = {"classify": ([], []), "v2": ([], [])}  # kind -> (first, later) server ms less compute
    for start in range(args.starts):
        proc, url = start_server()
        c = Client(url)
        order = ("classify", "v2") if start % 2 == 0 else ("v2", "classify")
        try:
            for kind in order:
                for k in range(3):
                    if kind == "classify":
                        status, body = c.classify(png, latency_budget_ms=200)
                        t = body.get("timing", {})
                    else:
                        c.conn.request("POST", "/v2/models/weights/infer", v2_body,
                                       {"Content-Type": "application/json"})  # fmt: skip
                        r = c.conn.getresponse()
                        status, body = r.status, json.loads(r.read())
                        t = body.get("parameters", {})
                    if status != 200:
                        raise SystemExit(f"{kind}: status {status}: {body}")
                    ms = t["total_ms"] - t["compute_ms"]
                    http[kind][0 if k == 0 else 1].append(ms)
                    print(f"start {start + 1} {kind:8s} #{k + 1}: server time less compute "
                          f"{ms:6.2f} ms (compute {t['compute_ms']:.2f} ms)")  # fmt: skip
        finally:
            c.close()
            proc.terminate()
            proc.wait(30)
    med = {f"{'first' if i == 0 else 'later'}_{kind}_ms": round(statistics.median(v[i]), 2)
           for kind, v in http.items() for i in (0, 1)}  # fmt: skip
    for kind in http:
        print(f"{kind:8s}: first request {med[f'first_{kind}_ms']:6.2f} ms, later "
              f"{med[f'later_{kind}_ms']:6.2f} ms (medians, server time less compute)")  # fmt: skip
    print(json.dumps(med))


if __name__ == "__main__":
    main()
