"""A lone client at one budget, through a spell of CPU contention: is it served again after?

    python bench/spell.py [--budget-x 2.2 | --budget-ms MS] [--pause-s 0.3] [--before 30]
                          [--spell 20] [--after 70] [--hogs 2] [--weights DIR]

Starts `snnet serve` on the bundled weights (default) and sends single held-out digits one at a
time, ``--pause-s`` apart (a sparse client: every batch starts after a pause), all with one
budget: ``--budget-x`` times the cheapest stitch's median round trip in a warm-up, or
``--budget-ms``. During the middle ``--spell`` requests, ``--hogs`` busy-looping processes take
the cores (a co-tenant). A server that learns what a pause or the device costs from the batches
it runs can talk itself into refusing such a budget while the spell lasts, and then, as a
refused request runs nothing, go on refusing it after the spell (before session 33: a 503
"batches after a pause run 2.20x their prediction just now" to every one of the 70 requests
after a 6 s spell, in two of four runs). The requests before the spell are the peer: what this
server gave this budget on a quiet machine.

Prints each phase as one character per request ("." answered, "4" 422, "5" 503), the counts
(and how many answers met the budget by the server's clock), the share of the model's time its
threads waited for a CPU in the phase (``snnet_model_cpu_wait_seconds_total`` over
``snnet_compute_seconds_sum``: whether the spell reached the forwards at all),
the first request answered after the spell, the last refusal's text and the controller's
figures at the end; then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, held_out_digits, start_server  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
HOG = "while True: pass"


def cpu_wait(c: Client) -> tuple[float, float]:
    """The server's model CPU wait and model time so far, in s (``/metrics``; 0 where the
    server predates the counter)."""
    text = c._send("GET", "/metrics").read().decode()
    figures = {"snnet_model_cpu_wait_seconds_total": 0.0, "snnet_compute_seconds_sum": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        base = name.split("{")[0]
        if base in figures:
            figures[base] += float(value)
    return figures["snnet_model_cpu_wait_seconds_total"], figures["snnet_compute_seconds_sum"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget-x", type=float, default=2.2)
    ap.add_argument("--budget-ms", type=float)
    ap.add_argument("--pause-s", type=float, default=0.3)
    ap.add_argument("--before", type=int, default=30)
    ap.add_argument("--spell", type=int, default=20)
    ap.add_argument("--after", type=int, default=70)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args()
    proc, url = start_server({"SNNET_WEIGHTS": args.weights})
    digits = held_out_digits(32)
    hogs: list[subprocess.Popen] = []
    try:
        c = Client(url)
        menu = c.get("/stitches")["stitches"]
        cheapest = min(menu, key=lambda s: (s["gflops"], s["id"]))["id"]

        def send(k: int, **fields) -> tuple[int, dict, float]:
            t0 = time.perf_counter()
            status, answer = c.classify(digits[k % len(digits)][0], **fields)
            return status, answer, (time.perf_counter() - t0) * 1e3

        warm = statistics.median(send(k, stitch_id=cheapest)[2] for k in range(10))
        budget = args.budget_ms or round(args.budget_x * warm, 2)
        phases = {"before": args.before, "spell": args.spell, "after": args.after}
        seen: dict[str, list[int]] = {}
        waited: dict[str, float] = {}  # the share of the model's time it waited for a CPU
        met: dict[str, list[bool]] = {}  # the answers' budget_met (the server's clock)
        last, k = "", 0
        for name, count in phases.items():
            if name == "spell":
                hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
            if name == "after":
                for h in hogs:
                    h.kill()
                    h.wait()
                hogs = []
            w0 = cpu_wait(c)
            for _ in range(count):
                time.sleep(args.pause_s)
                status, answer, _ = send(k, latency_budget_ms=budget)
                seen.setdefault(name, []).append(status)
                if status == 200:
                    met.setdefault(name, []).append(answer["budget_met"])
                last = answer.get("detail", last) if status != 200 else last
                k += 1
            w1 = cpu_wait(c)
            waited[name] = round((w1[0] - w0[0]) / max(w1[1] - w0[1], 1e-9), 3)
        ctl = c.get("/controller")
    finally:
        for h in hogs:
            h.kill()
        proc.terminate()
        proc.wait(30)

    def counts(name: str) -> dict:
        statuses = seen.get(name, [])
        return {"answered": statuses.count(200), "met": sum(met.get(name, [])),
                "422": statuses.count(422), "503": statuses.count(503)}  # fmt: skip

    after = seen.get("after", [])
    first = next((i for i, s in enumerate(after) if s == 200), None)
    mark = {200: ".", 422: "4", 503: "5"}
    print(f"# {Path(args.weights).name}: budget {budget:g} ms ({args.budget_x:g} x the cheapest "
          f"stitch's {warm:.2f} ms round trip), one request every {args.pause_s:g} s; "
          f"{args.hogs} hogs during the spell")  # fmt: skip
    for name, statuses in seen.items():
        print(f"{name:>7} {''.join(mark.get(s, '?') for s in statuses)}  {counts(name)}"
              f"  model CPU wait {waited[name]:.1%}")  # fmt: skip
    print(f"first answered after the spell: {'none' if first is None else f'request {first}'}")
    if last:
        print(f"last refusal: {last}")
    keys = ("device_factor", "idle_device_factor", "refuse_margin", "refuse_margin_ms",
            "rest_answers", "rest_answers_contended", "cold_start_ms",
            "cold_start_at_rest_ms")  # fmt: skip
    figures = {key: ctl[key] for key in keys if key in ctl}
    print(f"controller at the end: {figures}")
    print(json.dumps({
        "budget_ms": budget,
        **{name: {**counts(name), "cpu_wait": waited[name]} for name in seen},
        "first_answered_after": first, "answered_last_20": after[-20:].count(200),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
