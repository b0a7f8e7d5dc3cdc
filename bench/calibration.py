"""How well a fresh server's start-up predictions hold, before anything has corrected them.

    python bench/calibration.py [--weights DIR] [--starts 3] [--runs 3] [--sizes 1,8]

Starts ``snnet serve`` ``--starts`` times on ``--weights`` (default: the bundled checkpoint;
``/tmp/snnet-deit`` after ``bench/deit_idle.py`` has built it) with a fresh profile cache. Once
it is ready it reads every measured stitch's predicted compute (``GET /stitches``, at each of
``--sizes``), then asks for each of them ``--runs`` times by ``stitch_id`` with that many
images in one request, and compares the median compute the server reports with the
prediction. Only measured stitches: an estimated one's prediction is a guess the controller
corrects once it runs, not the calibration's doing.

Prints the server's calibration line and, per start and batch size, the median and the 90th
percentile of |predicted / measured - 1| over the stitches and their median ratio, and ends
with one JSON line of the same over all starts. Run it under old code with
``PYTHONPATH=<worktree>`` for a side-by-side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _server import Client, digit_pngs, start_server  # noqa: E402
from deit_idle import photo_jpeg  # noqa: E402

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def one_start(weights: str, sizes: list[int], runs: int) -> dict:
    pre = json.loads((Path(weights) / "manifest.json").read_text())["preprocessing"]
    # a digit for a digit model, else a 500x375 photo-like JPEG
    image = digit_pngs(1)[0] if max(pre["input_size"][-2:]) <= 64 else photo_jpeg()
    log: list[str] = []
    proc, url = start_server({"SNNET_WEIGHTS": weights}, log=log)
    try:
        for line in log:
            if "calibration:" in line:
                print("   ", line.rstrip()[24:])
        client = Client(url)
        menu = client.get("/stitches")["stitches"]
        out = {}
        for b in sizes:
            ratios = []
            for row in (r for r in menu if r["measured"] and str(b) in r["predicted_ms"]):
                times = []
                for _ in range(runs):
                    status, answer = client.classify(
                        [image] * b, stitch_id=row["id"], latency_budget_ms=60000
                    )
                    if status != 200:
                        raise SystemExit(f"stitch {row['id']} at batch {b}: {status} {answer}")
                    times.append(answer["timing"]["compute_ms"])
                ratios.append(row["predicted_ms"][str(b)] / statistics.median(times))
            out[b] = ratios
        return out
    finally:
        proc.terminate()
        proc.wait(60)


def summary(ratios: list[float]) -> dict:
    off = sorted(abs(r - 1.0) for r in ratios)
    return {
        "stitches": len(ratios),
        "median_off": round(statistics.median(off), 3),
        "p90_off": round(off[int(0.9 * (len(off) - 1))], 3),
        "median_ratio": round(statistics.median(ratios), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", default=str(WEIGHTS))
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", default="1,8")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    every: dict[int, list[float]] = {b: [] for b in sizes}
    for k in range(args.starts):
        print(f"start {k + 1} of {args.starts}: {args.weights}")
        got = one_start(args.weights, sizes, args.runs)
        for b in sizes:
            every[b] += got[b]
            s = summary(got[b])
            print(f"  batch {b}: {s['stitches']} measured stitches, predicted / measured compute "
                  f"off by {s['median_off']:.1%} at the median, {s['p90_off']:.1%} at the 90th "
                  f"percentile; median ratio x{s['median_ratio']:.2f}")  # fmt: skip
    print(json.dumps({str(b): summary(every[b]) for b in sizes}))


if __name__ == "__main__":
    main()
