"""The safety margin replayed on real answers: how many of the next answers it covers, and what
it costs, side by side with the rule it replaced.

    python bench/margin_replay.py [--data tests/data/deit_idle_answers.json] [--rows FILE ...]

Each run's (measured, predicted) ms of time outside the model queue, in order (from
``bench/deit_idle.py --rows``: its ``total_ms`` and ``predicted_ms``), is replayed through two
margin rules: the controller's own (``server.controller._margin``: a share plus fixed ms at
99.5%) and the peer, the rule up to session 10 (a share only: the window's 99th percentile of
measured / predicted, index ``int(0.99 * (n - 1))``, or a log-normal's 99.5% bound when wider
while under 200 answers). From the 20th answer of each run on, an answer is covered if it took
at most its prediction plus the margin learnt from the answers before it (the last 256). The
budgets' slack over the plan is not counted, so a live run meets more than this. Prints
coverage overall and for cheap predictions (< 40 ms), and the mean pad in ms for cheap and for
dear (> 100 ms) predictions, and, apart, the coverage of each run's first 20 answers (a fresh
server's, planned with the prior and fits to a few answers); ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server import controller  # noqa: E402

WINDOW, FROM = 256, 20


def share_at_99th(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """The peer: a share only, the window's own 99th percentile (session 10's rule)."""
    ratios = sorted(a / p for a, p in pairs)
    n = len(ratios)
    if n < 5:
        return 0.2, 0.0
    empirical = ratios[int(0.99 * (n - 1))]
    if n >= 200:
        return min(0.5, max(0.0, empirical - 1.0)), 0.0
    logs = [math.log(r) for r in ratios]
    z = statistics.NormalDist().inv_cdf(0.995)
    t = z + (z**3 + z) / (4 * (n - 1)) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * (n - 1) ** 2)
    fitted = math.exp(statistics.fmean(logs) + t * statistics.stdev(logs) * math.sqrt(1 + 1 / n))
    return min(0.5, max(0.2 if n < 20 else 0.0, max(empirical, fitted) - 1.0)), 0.0


def replay(runs: list[list[tuple[float, float]]], rule) -> dict:
    cheap, every, pad_cheap, pad_dear, early = [], [], [], [], []
    for run in runs:
        for k, (actual, predicted) in enumerate(run):
            share, fixed = rule(run[max(0, k - WINDOW) : k])
            if k < FROM:
                early.append(actual <= predicted * (1 + share) + fixed)
                continue
            pad = share * predicted + fixed
            hit = actual <= predicted + pad
            every.append(hit)
            if predicted < 40:
                cheap.append(hit)
                pad_cheap.append(pad)
            elif predicted > 100:
                pad_dear.append(pad)
    return {
        "covered": round(sum(every) / len(every), 4),
        "covered_cheap": round(sum(cheap) / len(cheap), 4),
        "pad_cheap_ms": round(statistics.fmean(pad_cheap), 1),
        "pad_dear_ms": round(statistics.fmean(pad_dear), 1),
        "answers": len(every),
        "covered_first": round(sum(early) / len(early), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--data",
        default=str(
            Path(__file__).resolve().parent.parent / "tests" / "data" / "deit_idle_answers.json"
        ),
    )
    ap.add_argument("--rows", nargs="*", help="bench/deit_idle.py --rows files instead of --data")
    args = ap.parse_args()
    if args.rows:
        runs = [
            [(r["total_ms"], r["predicted_ms"]) for r in map(json.loads, lines) if "total_ms" in r]
            for lines in (Path(f).read_text().splitlines() for f in args.rows)
        ]
    else:
        runs = [[tuple(x) for x in run] for run in json.loads(Path(args.data).read_text())["runs"]]
    ours = replay(runs, lambda pairs: controller._margin(pairs)[0])
    peer = replay(runs, share_at_99th)
    print(f"{len(runs)} runs, {ours['answers']} answers from the {FROM}th of each on")
    print(
        f"{'rule':<34}{'covered':>9}{'cheap':>8}{'pad cheap':>11}{'pad dear':>10}{'first 20':>10}"
    )
    for name, r in (("share + ms at 99.5% (ours)", ours), ("share at window p99 (before)", peer)):
        print(
            f"{name:<34}{100 * r['covered']:>8.1f}%{100 * r['covered_cheap']:>7.1f}%"
            f"{r['pad_cheap_ms']:>9.1f}ms{r['pad_dear_ms']:>8.1f}ms{100 * r['covered_first']:>9.1f}%"
        )
    print(json.dumps({"ours": ours, "before": peer}))


if __name__ == "__main__":
    main()
