"""What a lower promise buys: the same requests against servers that promise different shares of
budgets met (``SNNET_SLO_TARGET``), side by side.

    python bench/slo_target.py [--targets 0.99,0.95] [--requests 400] [--weights DIR]
                               [--images 1] [--think-s 0] [--block 40]

Starts `snnet serve` once per target on the same checkpoint (the bundled weights by default:
their manifest has every stitch's held-out accuracy) with one profile cache (the first measures,
the others read its figures: the same predictions) and sends one request at a time from one
client, the servers taking turns in blocks of ``--block`` requests (the order alternating), each
block the same held-out digits and budgets for every server, so that each sees the machine in
about the same state and the others sit idle meanwhile (each block begins with one request
pinned to the cheapest stitch, not counted: the block's first request would otherwise find the
model cold after the others' turn, which no steady client does). The budgets cycle over eight
levels spaced evenly in log between what the cheapest stitch's requests and 1.2x what the
dearest stitch's took end to end in a warm-up (five requests pinned to each, on every server):
the range where the choice of stitch is the server's.

Per server it prints: answers, refusals (422, 503), best-effort answers (budgets below the
promise, served by the fastest stitch), the attainment the alert holds against the promise
(``budget_met`` of the promised answers, by the server's clock, over those and the 503s), the
share of all answers within budget by the client's clock, the mean held-out accuracy of the
stitches that answered (from the manifest) and the answers' own accuracy against the digits'
true labels (a trained digit classifier only), the mean GFLOPs per image, and the last two
over the requests every server answered ("paired": the same requests); then the same per
budget level. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, held_out_digits, start_server  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
LEVELS = 8
WARM = 5  # warm-up requests pinned to each of the cheapest and the dearest stitch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--targets", default="0.99,0.95", help="SNNET_SLO_TARGET of each server")
    ap.add_argument("--requests", type=int, default=400, help="per server")
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--images", type=int, default=1, help="per request")
    ap.add_argument("--think-s", type=float, default=0.0, help="pause between requests")
    ap.add_argument("--block", type=int, default=40, help="requests to one server in a row")
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    digits = held_out_digits(500)
    servers = []
    cache = str(Path(tempfile.mkdtemp()) / "profiles.json")
    try:
        for t in targets:  # started one after the other: start-up profiling needs the cores
            env = {"SNNET_WEIGHTS": args.weights, "SNNET_SLO_TARGET": str(t)}
            proc, url = start_server({**env, "SNNET_PROFILE_CACHE": cache})
            servers.append((t, proc, Client(url)))
        menu = {s["id"]: s for s in servers[0][2].get("/stitches")["stitches"]}
        cheapest = min(menu, key=lambda i: (menu[i]["gflops"], i))
        dearest = max(menu, key=lambda i: (menu[i]["gflops"], -i))

        def request(c: Client, k: int, **fields) -> tuple[int, dict, float, list[int]]:
            batch = [digits[(k * args.images + j) % len(digits)] for j in range(args.images)]
            t0 = time.perf_counter()
            status, answer = c.classify([png for png, _ in batch], **fields)
            return status, answer, (time.perf_counter() - t0) * 1e3, [y for _, y in batch]

        took = {cheapest: [], dearest: []}
        for k in range(WARM):
            for s in took:
                for _, _, c in servers:
                    status, answer, rtt, _ = request(c, k, stitch_id=s)
                    if status != 200:
                        raise SystemExit(f"warm-up on stitch {s}: {status} {answer}")
                    took[s].append(rtt)
        lo, hi = statistics.median(took[cheapest]), 1.2 * statistics.median(took[dearest])
        budgets = [round(lo * (hi / lo) ** (i / (LEVELS - 1)), 2) for i in range(LEVELS)]
        rows: dict[float, list[dict]] = {t: [] for t in targets}
        digit_model = True
        # In blocks, each server alone on the machine in its turn: taking turns request by
        # request, one server's answer was still being finished (metrics, the controller's
        # figures) while the other read its next request, and on two cores that was contention
        # neither would meet alone.
        for first in range(0, args.requests, args.block):
            ks = range(first, min(args.requests, first + args.block))
            order = servers if (first // args.block) % 2 == 0 else servers[::-1]
            for t, _, c in order:
                request(c, first, stitch_id=cheapest)  # awake after the others' turn
                for k in ks:
                    budget = budgets[k % LEVELS]
                    status, answer, rtt, labels = request(c, k, latency_budget_ms=budget)
                    row = {"k": k, "budget": budget, "status": status, "rtt": rtt}
                    if status == 200:
                        s = menu[answer["stitch"]["id"]]
                        top = [int(p[0]["class_index"]) for p in answer["predictions"]]
                        # a digit classifier's answers (the bundled model's labels are "0".."9")
                        digit_model &= all(p[0]["label"] == str(p[0]["class_index"])
                                           for p in answer["predictions"])  # fmt: skip
                        row.update(
                            best_effort=answer.get("best_effort", False),
                            met=answer["budget_met"],
                            accuracy=s.get("accuracy"),
                            correct=sum(a == b for a, b in zip(top, labels, strict=True)),
                            gflops=s["gflops"],
                        )
                    rows[t].append(row)
                    if args.think_s:
                        time.sleep(args.think_s)
    finally:
        for _, proc, c in servers:
            c.close()
            proc.terminate()
        for _, proc, _ in servers:
            proc.wait(30)

    both = set.intersection(*({r["k"] for r in rows[t] if r["status"] == 200} for t in targets))

    def summary(rs: list[dict]) -> dict:
        ans = [r for r in rs if r["status"] == 200]
        promised = [r for r in ans if not r["best_effort"]]
        shed = sum(r["status"] == 503 for r in rs)
        accs = [r["accuracy"] for r in ans if r["accuracy"] is not None]
        paired = [r for r in ans if r["k"] in both]
        paired_accs = [r["accuracy"] for r in paired if r["accuracy"] is not None]
        return {
            "answered": len(ans),
            "refused_422": sum(r["status"] == 422 for r in rs),
            "refused_503": sum(r["status"] == 503 for r in rs),
            "best_effort": len(ans) - len(promised),
            "server_within": round(sum(r["met"] for r in promised) / (len(promised) + shed), 4)
            if promised or shed
            else None,
            "client_within": round(sum(r["rtt"] <= r["budget"] for r in ans) / len(ans), 4)
            if ans
            else None,
            "stitch_accuracy": round(statistics.fmean(accs), 3) if accs else None,
            "answer_accuracy": round(
                100 * sum(r["correct"] for r in ans) / (len(ans) * args.images), 2
            )
            if ans and accs and digit_model  # a trained digit classifier
            else None,
            "gflops": round(statistics.fmean(r["gflops"] for r in ans), 4) if ans else None,
            "paired": len(paired),
            "paired_stitch_accuracy": round(statistics.fmean(paired_accs), 3)
            if paired_accs
            else None,
            "paired_gflops": round(statistics.fmean(r["gflops"] for r in paired), 4)
            if paired
            else None,
        }

    print(
        f"# {args.requests} requests of {args.images} image(s) per server, one client taking "
        f"turns; {Path(args.weights).name}; budgets {budgets[0]:g}..{budgets[-1]:g} ms "
        f"(warm-up round trips: stitch {cheapest} {lo:.2f} ms, stitch {dearest} "
        f"{hi / 1.2:.2f} ms)"
    )
    print(
        "server: attainment (budget_met of promised answers, over those and the 503s); client: "
        f"answers within budget by this client's clock; paired: the {len(both)} requests every "
        "server answered"
    )
    head = (
        f"{'promise':>8}{'answered':>9}{'422':>5}{'503':>5}{'b.eff':>6}{'server':>8}"
        f"{'client':>8}{'stitch acc':>11}{'answers':>9}{'GFLOPs':>9}"
        f"{'paired acc':>11}{'GFLOPs':>9}"
    )
    print(head)
    figures = {}
    for t in targets:
        s = figures[str(t)] = summary(rows[t])

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        print(
            f"{t:>8g}{s['answered']:>9}{s['refused_422']:>5}{s['refused_503']:>5}"
            f"{s['best_effort']:>6}{pct(s['server_within']):>8}{pct(s['client_within']):>8}"
            f"{s['stitch_accuracy'] if s['stitch_accuracy'] is not None else '-':>11}"
            f"{s['answer_accuracy'] if s['answer_accuracy'] is not None else '-':>9}"
            f"{s['gflops'] if s['gflops'] is not None else '-':>9}"
            f"{s['paired_stitch_accuracy'] if s['paired_stitch_accuracy'] is not None else '-':>11}"
            f"{s['paired_gflops'] if s['paired_gflops'] is not None else '-':>9}"
        )
    print("per budget level (ms): mean stitch accuracy (or GFLOPs) / share within budget, client")
    for b in budgets:
        cells = []
        for t in targets:
            s = summary([r for r in rows[t] if r["budget"] == b])
            value = s["stitch_accuracy"] if s["stitch_accuracy"] is not None else s["gflops"]
            within = "-" if s["client_within"] is None else f"{100 * s['client_within']:.0f}%"
            cells.append(f"{t:g}: {'-' if value is None else value} / {within}")
        print(f"  {b:>8g}  " + "   ".join(cells))
    print(json.dumps({"budgets_ms": [budgets[0], budgets[-1]], **figures}))


if __name__ == "__main__":
    main()
