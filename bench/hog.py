"""A CPU hog starts mid-run: how fast do predictions (and budgets met) recover?

    python bench/hog.py [--seconds 24] [--hog-at 8] [--hog-for 8] [--hogs 2] [--images 8]

Starts `snnet serve` on ``--weights`` (default: the bundled weights/) and sends requests of
``--images`` held-out digits back to back from one client, with budgets spread over the
stitches' range (from twice the cheapest stitch's predicted time to 1.5x the most accurate
one's, cycling, times ``--budget-scale``), so that many stitches answer. At ``--hog-at`` seconds
it starts ``--hogs`` busy-looping processes (a co-tenant taking the cores) for ``--hog-for``
seconds. Prints, per second, the requests sent, refused and answered late, the share within
budget as the client measured it (a refusal counts as a miss), the server's device factor and
the mean stitch cost; then the attainment before, in the first second of, during and after the
hog, and how many seconds after the hog started the answers were back to >= 90% within budget
for good (a refusal is not a broken promise: no stitch may fit a budget on the slowed device;
the same counting refusals as misses is printed too). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
HOG = "while True: pass"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=24)
    ap.add_argument("--hog-at", type=float, default=8)
    ap.add_argument("--hog-for", type=float, default=8)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every budget (looser: > 1)"
    )
    ap.add_argument("--weights", default=str(WEIGHTS))
    args = ap.parse_args()
    proc, url = start_server({"SNNET_WEIGHTS": args.weights})
    pngs = digit_pngs()
    body = pngs[: args.images]
    records, factors = [], []
    hogs: list[subprocess.Popen] = []
    try:
        c = Client(url)
        menu = c.get("/stitches")["stitches"]
        size = str(max(int(b) for b in menu[0]["predicted_ms"] if int(b) <= args.images))
        ms = sorted(s["predicted_ms"][size] for s in menu)
        # The most accurate stitch (the dearest where the checkpoint records no accuracy).
        best = max(menu, key=lambda s: (s["accuracy"] or -1.0, s["gflops"]))
        lo, hi = 2 * ms[0], 1.5 * best["predicted_ms"][size]
        lo, hi = lo * args.budget_scale, hi * args.budget_scale
        budgets = [lo * (hi / lo) ** (k / 9) for k in range(10)]
        probe = Client(url)
        stop = threading.Event()

        def watch() -> None:  # the controller's device factor, 4 times a second
            while not stop.is_set():
                state = probe.get("/controller")
                factors.append((time.monotonic() - t0, state.get("device_factor", None)))
                stop.wait(0.25)

        t0 = time.monotonic()
        threading.Thread(target=watch, daemon=True).start()
        i = 0
        while (now := time.monotonic() - t0) < args.seconds:
            if not hogs and args.hog_at <= now < args.hog_at + args.hog_for:
                hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
            if hogs and now >= args.hog_at + args.hog_for:
                for h in hogs:
                    h.kill()
                hogs = []
            budget = budgets[i % len(budgets)]
            i += 1
            t1 = time.perf_counter()
            status, answer = c.classify(body, latency_budget_ms=round(budget, 3))
            rtt = (time.perf_counter() - t1) * 1e3
            ok = status == 200
            gflops = answer["stitch"]["gflops"] if ok else None
            server = (
                (answer["timing"]["total_ms"], answer["timing"]["predicted_ms"]) if ok else None
            )
            records.append((now, budget, status, rtt, gflops, server))
        stop.set()
        c.close()
    finally:
        for h in hogs:
            h.kill()
        proc.terminate()
        proc.wait(30)

    def within(rs) -> float | None:
        return sum(1 for r in rs if r[2] == 200 and r[3] <= r[1]) / len(rs) if rs else None

    def server_within(rs) -> float | None:
        return sum(1 for r in rs if r[2] == 200 and r[5][0] <= r[1]) / len(rs) if rs else None

    print(f"# one client, {args.images}-image requests, budgets {lo:.1f}..{hi:.1f} ms, "
          f"{args.hogs} hogs from {args.hog_at:g} s for {args.hog_for:g} s")  # fmt: skip
    print(
        f"{'second':>6} {'sent':>5} {'refused':>7} {'late':>5} {'within':>7} {'server':>7} "
        f"{'factor':>7} {'mean MFLOPs':>12}"
    )
    windows, on_time_windows = [], []
    for sec in range(int(args.seconds)):
        rs = [r for r in records if sec <= r[0] < sec + 1]
        f = [v for t, v in factors if sec <= t < sec + 1 and v is not None]
        served = [r[4] for r in rs if r[4] is not None]
        w, sw = within(rs), server_within(rs)
        windows.append(w)
        answered_now = [r for r in rs if r[2] == 200]
        on_time_windows.append(
            sum(1 for r in answered_now if r[3] <= r[1]) / len(answered_now)
            if answered_now
            else None
        )
        mark = " <- hog" if args.hog_at <= sec < args.hog_at + args.hog_for else ""
        refused = sum(1 for r in rs if r[2] != 200)
        late = sum(1 for r in rs if r[2] == 200 and r[3] > r[1])
        print(
            f"{sec:>6} {len(rs):>5} {refused:>7} {late:>5} {w if w is None else f'{w:.1%}':>7} "
            f"{sw if sw is None else f'{sw:.1%}':>7} "
            f"{(f'{f[-1]:.2f}' if f else '-'):>7} "
            f"{(f'{1e3 * sum(served) / len(served):.1f}' if served else '-'):>12}{mark}"
        )
    start, end = int(args.hog_at), int(args.hog_at + args.hog_for)

    def back_for_good(shares: list[float | None]) -> int | None:
        """Seconds after the hog started from which every second's share stayed >= 90%."""
        return next(
            (s - start for s in range(start, end) if all((w or 0) >= 0.9 for w in shares[s:end])),
            None,
        )

    recovered_all = back_for_good(windows)
    recovered = back_for_good(on_time_windows)
    phase = {
        "before": within([r for r in records if r[0] < args.hog_at]),
        "first_second": within([r for r in records if args.hog_at <= r[0] < args.hog_at + 1]),
        "during": within([r for r in records if args.hog_at <= r[0] < args.hog_at + args.hog_for]),
        "after": within([r for r in records if r[0] >= args.hog_at + args.hog_for + 1]),
    }
    print("client: " + " ".join(f"{k} {v:.1%}" for k, v in phase.items() if v is not None))
    during = [r for r in records if args.hog_at <= r[0] < args.hog_at + args.hog_for]
    answered = [r for r in during if r[2] == 200]
    on_time = sum(1 for r in answered if r[3] <= r[1]) / len(answered) if answered else None
    print(
        f"during the hog: {len(during) - len(answered)} of {len(during)} refused (no stitch fits "
        f"the budget on the slowed device, or shed), answered within budget "
        f"{'-' if on_time is None else f'{on_time:.1%}'}"
    )
    idle = [r for r in records if r[0] < args.hog_at and r[2] == 200]
    late = [r for r in idle if r[5][0] > r[1]]
    print(
        f"before the hog, server-side: {len(late)} of {len(idle)} answers over budget; "
        f"client - server time median "
        f"{sorted(r[3] - r[5][0] for r in idle)[len(idle) // 2]:.2f} ms; "
        f"server total - predicted median {sorted(r[5][0] - r[5][1] for r in idle)[len(idle) // 2]:.2f} ms"
    )
    print(
        f"answers back to >= 90% within budget for good {recovered} s after the hog started "
        f"(counting refusals as misses too: {recovered_all} s)"
    )
    print(json.dumps({"attainment": {k: round(v, 4) for k, v in phase.items() if v is not None},
                      "recovered_s": recovered, "recovered_with_refusals_s": recovered_all, "requests": len(records),
                      "answered_within_during": None if on_time is None else round(on_time, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
