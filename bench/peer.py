"""snnet-serve against a plain server of the same checkpoint's most accurate anchor, one open-loop
client, one budget: how much more traffic does the stitch range buy, and at what accuracy?

    python bench/peer.py [--quick] [--weights DIR] [--budget 100] [--rates 20,40,...] [--seconds 5]

The plain server (``bench/_plain.py``) is what a user writes without SN-Net: FastAPI + the timm
model, a sync route, PIL decode. `snnet serve` runs on the same checkpoint with its defaults.
Each is started alone (never both at once on the machine) and driven by the same open-loop
client: Poisson arrivals at each offered rate for ``--seconds``, one real held-out digit per
request (true labels known), every request with the same ``--budget`` (snnet-serve gets it as
``latency_budget_ms``; the plain server has nothing to do with it). Latency counts from the
scheduled send time (no coordinated omission). Per offered rate it prints: share within budget
(answered and in time / sent), accuracy of the answers against the true labels, p50/p99.

After the list of rates, ``--refine`` more runs per server and criterion halve the gap between
the highest rate that met it and the lowest that did not. Then: the highest offered rate each keeps >= 99% within
budget ("rate"), their ratio
(target >= 3x), the accuracy of the answers at those rates; the highest rate at which
snnet-serve keeps >= 99% within budget *and* its answering stitches' held-out accuracy is on
average within 1 point of the plain model's ("ratio_at_1pt"), and the "ideal" ratio there from
the model's own accuracy/cost menu: the plain model's profiled cost per image over the least
cost that reaches 1 point less, mixing at most two stitches ("ideal_at_1pt"; target:
ratio_at_1pt >= 0.8 of it). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, open_loop, start_script, start_server  # noqa: E402

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parent / "weights"
QUICK_RATES = "25,50,75,100,150,200,300,400,600"
FULL_RATES = "20,30,40,50,60,80,100,125,150,200,250,300,400,500,600,800"


def held_out_digits(n: int = 256) -> list[tuple[bytes, int]]:
    """(PNG bytes, true label) of real held-out MNIST digits."""
    import io

    from PIL import Image

    from snnet_core.data import mnist_subset

    x, y = mnist_subset("held_out")
    out = []
    for i in range(min(n, len(x))):
        buf = io.BytesIO()
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(buf, "PNG")
        out.append((buf.getvalue(), int(y[i])))
    return out


def start_plain(weights: str) -> tuple[subprocess.Popen, str]:
    return start_script([str(HERE / "_plain.py"), weights], "/healthz")


def drive(
    url: str, rate: float, seconds: float, budget: float, digits, seed: int, held_out: float
) -> dict:
    """One open-loop run at ``rate`` requests/s; the figures of the answers. ``held_out``: the
    plain server's model's held-out accuracy (snnet-serve says its stitch's in each answer)."""
    rng = random.Random(seed)
    t, sends = 0.0, []
    while (t := t + rng.expovariate(rate)) < seconds:
        sends.append((t, rng.choice(digits)))
    rows, lock = [], threading.Lock()
    gc.collect()
    gc.freeze()
    start = time.monotonic() + 0.2

    def handle(c: Client, job: tuple) -> None:
        at, (png, label) = job
        try:
            status, answer = c.classify(png, latency_budget_ms=budget)
        except OSError:
            status, answer = 0, {}
        ms = (time.monotonic() - start - at) * 1e3
        got, expected = None, None
        if status == 200 and "predictions" in answer:  # snnet-serve
            got = answer["predictions"][0][0]["class_index"]
            expected = answer["stitch"]["accuracy"]
        elif status == 200:  # the plain server
            got, expected = answer["class_index"], held_out
        with lock:
            rows.append((status, ms, got == label if got is not None else None, expected))

    open_loop(url, sends, handle, 32, start)
    answered = [r for r in rows if r[0] == 200]
    lat = sorted(r[1] for r in answered) or [float("nan")]
    return {
        "rate": rate,
        "sent": len(rows),
        "within": sum(1 for r in answered if r[1] <= budget) / max(1, len(rows)),
        "accuracy": 100 * sum(1 for r in answered if r[2]) / len(answered) if answered else None,
        "expected": statistics.fmean(r[3] for r in answered) if answered else None,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def hull_cost(stitches: list[dict], accuracy: float) -> float:
    """Least profiled ms per image (largest batch) that reaches ``accuracy`` on average, serving a
    mix of at most two stitches (the lower hull of the menu's cost/accuracy points)."""
    size = str(max(int(b) for b in stitches[0]["latency_ms"]))
    pts = [(r["latency_ms"][size], r["accuracy"]) for r in stitches if r["accuracy"] is not None]
    best = min((c for c, a in pts if a >= accuracy), default=float("inf"))
    for c1, a1 in pts:
        for c2, a2 in pts:
            if a1 < accuracy < a2:  # mix: w of stitch 2 so that the mean accuracy is reached
                w = (accuracy - a1) / (a2 - a1)
                best = min(best, (1 - w) * c1 + w * c2)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help=f"rates {QUICK_RATES}, 4 s each")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--budget", type=float, default=100.0, help="ms, every request")
    ap.add_argument("--rates", help=f"requests/s, comma-separated (default {FULL_RATES})")
    ap.add_argument("--seconds", type=float, help="per rate (default 8, 4 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--refine", type=int, default=2,
        help="extra runs per server halving the gap around its highest rate kept (default 2)",
    )  # fmt: skip
    args = ap.parse_args()
    rates = [
        float(r) for r in (args.rates or (QUICK_RATES if args.quick else FULL_RATES)).split(",")
    ]
    seconds = args.seconds or (4.0 if args.quick else 8.0)
    digits = held_out_digits()
    # The menu first (the plain server's accuracy is its anchor's, from the same manifest).
    import snnet_core

    manifest = snnet_core.read_manifest(args.weights)
    anchors = [r for r in manifest.stitches if len(r["anchors"]) == 1]
    anchor = max(anchors, key=lambda r: (r["accuracy"] or 0, r["gflops"]))
    held_out = anchor["accuracy"]
    results: dict[str, list[dict]] = {}
    stitches = None
    for name in ("plain", "snnet"):
        if name == "plain":
            proc, url = start_plain(args.weights)
        else:
            proc, url = start_server({"SNNET_WEIGHTS": args.weights})
        try:
            if name == "snnet":
                c = Client(url)
                stitches = c.get("/stitches")["stitches"]
                c.close()
            drive(url, rates[0], 1.0, args.budget, digits, args.seed, held_out)  # warm-up
            results[name] = []
            criteria = [lambda x: x["within"] >= 0.99]
            if name == "snnet":  # and where it also loses at most 1 point
                criteria.append(lambda x: x["within"] >= 0.99 and x["expected"] >= held_out - 1)
            todo, k, refined = list(rates), 0, dict.fromkeys(range(len(criteria)), 0)
            while todo:
                rate = todo.pop(0)
                r = drive(url, rate, seconds, args.budget, digits, args.seed + k, held_out)
                k += 1
                results[name].append(r)
                print(f"{name:>5} {rate:6.0f}/s  within {r['within']:7.2%}  accuracy "
                      f"{_f(r['accuracy'])} (held-out of the answering model {_f(r['expected'])})  "
                      f"p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms", file=sys.stderr)  # fmt: skip
                if r["within"] < 0.5:
                    todo = [x for x in todo if x < rate]  # higher rates tell nothing more
                for i, ok in enumerate(criteria):
                    if todo or refined[i] >= args.refine:
                        continue
                    # Between the highest rate that met it and the lowest that did not: halve.
                    lo = max((x["rate"] for x in results[name] if ok(x)), default=None)
                    hi = min((x["rate"] for x in results[name] if not ok(x)), default=None)
                    if lo is not None and hi is not None and lo < hi and hi - lo > 0.05 * lo:
                        todo, refined[i] = [round((lo + hi) / 2)], refined[i] + 1
        finally:
            proc.terminate()
            proc.wait(30)

    def highest(rows: list[dict], ok=lambda r: True) -> dict | None:
        good = [r for r in rows if r["within"] >= 0.99 and ok(r)]
        return max(good, key=lambda r: r["rate"]) if good else None

    plain, snnet = highest(results["plain"]), highest(results["snnet"])
    # "Points lost" by the held-out accuracy of the answering stitches (a few hundred answers
    # per rate measure true-label accuracy to about +-1 point; the answers' own is printed).
    at_1pt = highest(results["snnet"], lambda r: r["expected"] >= held_out - 1.0)
    size = str(max(int(b) for b in stitches[0]["latency_ms"]))
    anchor_cost = next(r for r in stitches if r["id"] == anchor["id"])["latency_ms"][size]
    ideal = anchor_cost / hull_cost(stitches, held_out - 1.0)
    ratio = snnet["rate"] / plain["rate"] if plain and snnet else None
    ratio_1pt = at_1pt["rate"] / plain["rate"] if plain and at_1pt else None
    print(f"\n# {args.weights}: plain = {anchor['description']} ({held_out}% held out); budget "
          f"{args.budget:g} ms, {seconds:g} s per offered rate, one held-out digit per request")  # fmt: skip
    print(f"{'rate/s':>7} | {'plain within':>12} {'acc':>6} {'p50':>6} {'p99':>6} | "
          f"{'snnet within':>12} {'acc':>6} {'model':>6} {'p50':>6} {'p99':>6}")  # fmt: skip
    by_rate = {n: {r["rate"]: r for r in rows} for n, rows in results.items()}
    for rate in sorted({r for rows in by_rate.values() for r in rows}):
        p, q = by_rate["plain"].get(rate), by_rate["snnet"].get(rate)
        left = (f"{p['within']:12.2%} {_f(p['accuracy']):>6} {p['p50']:6.1f} {p['p99']:6.1f}"
                if p else f"{'-':>12} {'-':>6} {'-':>6} {'-':>6}")  # fmt: skip
        right = (f"{q['within']:12.2%} {_f(q['accuracy']):>6} {_f(q['expected']):>6} "
                 f"{q['p50']:6.1f} {q['p99']:6.1f}" if q else "-")  # fmt: skip
        print(f"{rate:7.0f} | {left} | {right}")
    print(f"highest rate with >= 99% within budget: plain {plain and plain['rate']}/s, snnet "
          f"{snnet and snnet['rate']}/s (answers {_f(snnet and snnet['accuracy'])}% right): "
          f"ratio {_f(ratio)} (target >= 3)")  # fmt: skip
    print(f"with <= 1 point lost (held-out accuracy of the answering stitches >= {held_out - 1:g}):"
          f" snnet {at_1pt and at_1pt['rate']}/s, ratio {_f(ratio_1pt)}; the menu's ideal there "
          f"(least cost reaching {held_out - 1:g}%, mixing two stitches) {ideal:.2f}x: "
          f"{_f(ratio_1pt and ratio_1pt / ideal)} of it (target >= 0.8)")  # fmt: skip
    if snnet is not None and snnet["rate"] >= rates[-1]:
        print("(snnet kept the highest rate offered: its limit is higher; raise --rates)")
    print(json.dumps({
        "plain_rate": plain and plain["rate"], "snnet_rate": snnet and snnet["rate"],
        "ratio": ratio and round(ratio, 2),
        "snnet_accuracy": snnet and snnet["accuracy"] and round(snnet["accuracy"], 2),
        "plain_accuracy": plain and plain["accuracy"] and round(plain["accuracy"], 2),
        "ratio_at_1pt": ratio_1pt and round(ratio_1pt, 2), "ideal_at_1pt": round(ideal, 2),
        "fraction_of_ideal_at_1pt": ratio_1pt and round(ratio_1pt / ideal, 2),
    }))  # fmt: skip


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
