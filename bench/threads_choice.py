"""How steadily `SNNET_THREADS=auto` chooses, this rule and the one before it side by side.

    python bench/threads_choice.py [--weights weights] [--rounds 6] [--cotenant 0.5]
                                   [--batch-check 8]

Loads the checkpoint as the server does and, round after round, lets both rules choose between
the cores minus one and every core for it, alternating which goes first:

- this rule (``server.profiling.choose_threads``): each round times each anchor once on each
  count, a close choice of fewer threads is timed twice, and every core goes to the model only
  if the largest and the smallest anchor both run ``t(n - 1) >= 1.1 x t(n) + front_ms``, the
  front end's work for one request measured here;
- the rule until session 19, rebuilt here as the peer: each count timed in a block (the fastest
  of at least 5 runs and 100 ms), and every core only if both anchors run ``max(1.15, 1 + 1 /
  (2 (n - 1)))`` times faster on it (1.5x on 2 cores), whatever the front end costs.

With ``--cotenant D``, a process busy for D of every 20 ms (and asleep for the rest) runs
beside it throughout: a neighbour on a shared VM, whose noise the rules must not mistake for
the model's scaling.

The rule times the anchors at batch 1. Under load requests batch, and the front end's share
grows: at batch B the test would be ``t_B(n - 1) >= 1.1 x t_B(n) + B x front_ms``. With
``--batch-check B`` the script also times both anchors at batch B on both counts (the fastest of
at least 3 runs) and says what that test would choose.

A start that chooses the other count than most do serves differently (on the 2-core VM the DeiT
net's DeiT-B at 404-465 ms on 1 thread against 222-293 on 2). Prints each round's times and
choices and ends with one JSON line: each rule's choices, how many rounds agreed with its
most frequent one, and the median seconds a choice took (start-up time).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import snnet_core  # noqa: E402
from server.environ import cores  # noqa: E402
from server.imaging import make_transform  # noqa: E402
from server.profiling import (  # noqa: E402
    THREADS_GAIN,
    choose_threads,
    deciding_anchors,
    front_end_ms,
    thread_times,
)


def old_rule(net, menu, n: int) -> tuple[int, dict[str, float]]:
    """The rule until session 19: (choice, each anchor's gain t(n - 1) / t(n))."""
    which = deciding_anchors(menu)
    x = torch.zeros(1, *net.input_size)
    ms: dict[str, dict[int, float]] = {name: {} for name in which}
    with torch.inference_mode():
        for k in (n - 1, n):
            torch.set_num_threads(k)
            for name, stitch in which.items():
                net(x, stitch)
                times: list[float] = []
                while len(times) < 5 or (sum(times) < 100.0 and len(times) < 50):
                    t0 = time.perf_counter()
                    net(x, stitch)
                    times.append((time.perf_counter() - t0) * 1e3)
                ms[name][k] = min(times)
    need = max(1.15, 1 + 1 / (2 * (n - 1)))
    gains = {name: t[n - 1] / t[n] for name, t in ms.items()}
    return (n if all(g >= need for g in gains.values()) else n - 1), gains


COTENANT = """
import time
duty = {duty}
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.02 * duty:
        pass
    time.sleep(0.02 * (1 - duty))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--weights", default="weights", help="checkpoint directory (default: bundled)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cotenant", type=float, default=0.0, help="busy share of a neighbour")
    ap.add_argument("--batch-check", type=int, default=0, help="also test the rule at this batch")
    args = ap.parse_args()
    n = cores()
    if n < 2:
        sys.exit("needs at least 2 cores: on 1 there is no choice to make")
    torch.manual_seed(0)
    net, manifest = snnet_core.load(args.weights)
    net = net.eval()
    menu = snnet_core.StitchMenu.of(manifest.stitches)
    pre = manifest.preprocessing
    torch.set_num_threads(n - 1)  # as the server measures it
    front_ms = front_end_ms(make_transform(pre), tuple(pre["input_size"]))
    print(f"{args.weights}: {len(menu)} stitches, {n} cores, front end {front_ms:.2f} ms a request")
    picks: dict[str, list[int]] = {"new": [], "old": []}
    seconds: dict[str, list[float]] = {"new": [], "old": []}
    neighbour = None
    if args.cotenant > 0:
        code = COTENANT.format(duty=min(args.cotenant, 1.0))
        neighbour = subprocess.Popen([sys.executable, "-c", code])
        print(f"a neighbour busy {args.cotenant:.0%} of the time runs beside it")
    try:
        rounds(args.rounds, net, menu, n, front_ms, picks, seconds)
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
    if args.batch_check:
        summary_check = batch_check(net, menu, n, front_ms, args.batch_check)
    summary = {"weights": args.weights, "cores": n, "rounds": args.rounds}
    summary |= {"cotenant": args.cotenant, "front_ms": round(front_ms, 2)}
    for rule, got in picks.items():
        counts = collections.Counter(got)
        summary[f"{rule}_picks"] = {str(k): counts[k] for k in sorted(counts)}
        summary[f"{rule}_agree"] = counts.most_common(1)[0][1]
        summary[f"{rule}_s"] = round(statistics.median(seconds[rule]), 2)
    if args.batch_check:
        summary["batch_check"] = summary_check
    print(json.dumps(summary))


def batch_check(net, menu, n: int, front_ms: float, batch: int) -> dict:
    """Both anchors at ``batch`` on n - 1 and n threads, and what the rule would choose there."""
    ms = thread_times(net, menu, (n - 1, n), floor_ms=0.0, repeats=3, batch=batch)
    out: dict = {"batch": batch}
    for name, t in ms.items():
        need = (1 + THREADS_GAIN) * t[n] + batch * front_ms
        out[name] = {f"ms_{n - 1}": round(t[n - 1], 2), f"ms_{n}": round(t[n], 2)}
        out[name]["need_ms"] = round(need, 2)
        print(
            f"batch {batch}, {name} anchor: {t[n - 1]:.2f} ms on {n - 1} threads, {t[n]:.2f} on "
            f"{n}; {n} threads need {n - 1} threads' time >= {need:.2f} ms",
            flush=True,
        )
    out["pick"] = (
        n if all(out[name][f"ms_{n - 1}"] >= out[name]["need_ms"] for name in ms) else n - 1
    )
    return out


def rounds(count: int, net, menu, n: int, front_ms: float, picks: dict, seconds: dict) -> None:
    """Both rules choose ``count`` times, taking turns at going first; their choices and how
    long each took go to ``picks`` and ``seconds``."""
    for r in range(count):
        order = ("new", "old") if r % 2 == 0 else ("old", "new")
        for rule in order:
            t0 = time.perf_counter()
            if rule == "new":
                pick, figures = choose_threads(net, menu, front_ms)
                print(f"round {r + 1} this rule: {pick} threads ({figures})", flush=True)
            else:
                pick, gains = old_rule(net, menu, n)
                shown = ", ".join(f"{k} {g:.2f}x" for k, g in gains.items())
                print(f"round {r + 1} old rule:  {pick} threads (gains {shown})", flush=True)
            picks[rule].append(pick)
            seconds[rule].append(time.perf_counter() - t0)


if __name__ == "__main__":
    main()
