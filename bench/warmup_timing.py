"""Is one timed warm-up run a fair measurement of a stitch? The server scales each estimated
stitch's latency by its warm-up run at batch 1 (``server.profiling.rescale_estimates``); this
checks that run against the same stitch's later runs.

    python bench/warmup_timing.py [--dir /tmp/snnet-deit] [--threads 2] [--repeats 3]

Loads a checkpoint (default: the DeiT-Ti/S/B net ``bench/deit_idle.py`` builds), runs the warm-up
as the server's model process does (``server.runner._warm_up`` at batch 1: the anchors first,
then every other stitch once, timed), then every stitch ``--repeats`` more times, and prints the
ratio of each stitch's warm-up time to the median of its later runs. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from server.runner import _warm_up  # noqa: E402
from snnet_core.checkpoint import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/snnet-deit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not (Path(args.dir) / "manifest.json").is_file():
        raise SystemExit(f"no checkpoint in {args.dir}: run bench/deit_idle.py once to build it")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    net, _ = load(args.dir)
    net.eval()
    first = _warm_up(net, [1], torch.device("cpu"), torch.float32)
    later: dict[int, list[float]] = {s: [] for s in first}
    x = torch.zeros(1, *net.input_size)
    with torch.inference_mode():
        for _ in range(args.repeats):
            for s in first:
                t0 = time.perf_counter()
                net(x, s)
                later[s].append((time.perf_counter() - t0) * 1e3)
    ratios = sorted(first[s] / statistics.median(later[s]) for s in first)
    n = len(ratios)
    fig = {
        "stitches": n,
        "p10": round(ratios[n // 10], 3),
        "median": round(ratios[n // 2], 3),
        "p90": round(ratios[(9 * n) // 10], 3),
        "max": round(ratios[-1], 3),
    }
    print(
        f"{n} stitches (anchors excluded), warm-up run / median of {args.repeats} later runs: "
        f"p10 x{fig['p10']}, median x{fig['median']}, p90 x{fig['p90']}, max x{fig['max']}"
    )
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
