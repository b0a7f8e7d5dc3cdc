"""Model threads bound one per CPU against floating threads, side by side on a real-size net.

    python bench/pinning.py [--rounds 2] [--requests 300] [--clients 3] [--seconds 20]
                            [--dir /tmp/snnet-deit]

When the model's torch threads take every CPU, the model process binds one to each
(``server.runner.PIN_ENV``). This serves the DeiT-Ti/S/B SN-Net (built by
``bench/deit_idle.py``) both ways, alternating, ``--rounds`` times each: bound (the default) and
floating (``OMP_PROC_BIND=false``, the user's override). Each start does two things:

- **steadiness**: one client sends ``--requests`` sequential requests for stitch 0 (the
  cheapest, a photo-sized JPEG in JSON) and the script takes the server's compute time of each
  (the first 20 dropped): median, 99th percentile and max above the median;
- **under contention**: ``--clients`` clients send requests back to back for ``--seconds`` with
  a 150 ms budget: answers per second and the share within budget (server-side).

Ends with one JSON line: each way's medians over its rounds.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import start_server  # noqa: E402
from deit_idle import photo_jpeg  # noqa: E402

WAYS = {"bound": {}, "floating": {"OMP_PROC_BIND": "false"}}


def steadiness(url: str, body: str, n: int) -> dict[str, float]:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    compute = []
    for _ in range(n):
        conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        if r.status != 200:
            raise SystemExit(f"stitch 0 refused: {r.status} {answer}")
        compute.append(answer["timing"]["compute_ms"])
    conn.close()
    xs = sorted(compute[20:])
    m = statistics.median(xs)
    return {
        "median_ms": round(m, 2),
        "p99_over_ms": round(xs[int(0.99 * len(xs))] - m, 2),
        "max_over_ms": round(xs[-1] - m, 2),
    }


def contention(url: str, image: str, clients: int, seconds: float) -> dict[str, float]:
    u, budget = urlparse(url), 150.0
    body = json.dumps({"image": image, "latency_budget_ms": budget})
    answers: list[float] = []  # server total ms of each answer
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
        while time.monotonic() < end:
            conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            answer = json.loads(r.read())
            if r.status == 200:
                answers.append(answer["timing"]["total_ms"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "answers_per_s": round(len(answers) / seconds, 1),
        "within": round(sum(t <= budget for t in answers) / max(1, len(answers)), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--dir", default="/tmp/snnet-deit")
    args = ap.parse_args()
    if args.requests < 40:
        raise SystemExit("--requests: at least 40 (the first 20 are dropped)")
    if not (Path(args.dir) / "manifest.json").is_file():
        raise SystemExit(f"no checkpoint in {args.dir}: run bench/deit_idle.py once to build it")
    image = base64.b64encode(photo_jpeg()).decode()
    body = json.dumps({"image": image, "stitch_id": 0})
    # One profile cache for every start: the later ones calibrate it instead of measuring.
    cache = str(Path(tempfile.mkdtemp()) / "profiles.json")
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way, env in WAYS.items():
            log: list[str] = []
            env = {"SNNET_WEIGHTS": args.dir, "SNNET_PROFILE_CACHE": cache, **env}
            proc, url = start_server(env, log=log)
            try:
                said = next((line for line in log if "model process" in line), "")
                if ("one bound to each CPU" in said) != (way == "bound"):
                    raise SystemExit(
                        f"the {way} server did not start that way (fewer threads than CPUs, or "
                        f"OMP_PROC_BIND set in this shell?): {said.strip()}"
                    )
                fig = {**steadiness(url, body, args.requests)}
                fig.update(contention(url, image, args.clients, args.seconds))
            finally:
                proc.terminate()
                proc.wait(60)
            runs[way].append(fig)
            print(f"round {r + 1}, {way}: {fig}  ({said.strip()[24:]})", flush=True)
    summary = {
        way: {k: round(statistics.median(f[k] for f in figs), 4) for k in figs[0]}
        for way, figs in runs.items()
    }
    print("\nstitch 0, compute time (ms); contention: answers/s, share within 150 ms")
    print(f"{'':10}" + "".join(f"{k:>15}" for k in summary["bound"]))
    for way, fig in summary.items():
        print(f"{way:10}" + "".join(f"{v:>15}" for v in fig.values()))
    b, f = summary["bound"], summary["floating"]
    summary["p99_over_ratio"] = round(f["p99_over_ms"] / max(b["p99_over_ms"], 1e-3), 2)
    summary["throughput_ratio"] = round(b["answers_per_s"] / f["answers_per_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
