"""The hop to the model process: a batch by shared memory against the same batch as bytes
through the socket, side by side.

    python bench/model_hop.py [--dir /tmp/snnet-deit] [--stitch 0] [--rounds 3] [--runs 12]

Two ``ProcessRunner`` children of the same checkpoint (built by ``bench/deit_idle.py``; any
``snnet_core.save`` directory works): one takes batches up to 8 by shared memory (the server's
default), the other with ``max_batch=0``, so every batch goes as bytes through the socket (as
before). They run in alternating rounds at batch 1 and 8. Each call's round trip, the forward
as the child timed it, and the hop (the difference: copies, socket, wake-ups), medians
over all rounds; ends with one JSON line.
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
import snnet_core  # noqa: E402
from server.runner import ProcessRunner  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/snnet-deit")
    ap.add_argument("--stitch", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=12, help="calls per round at batch 1 (8: a third)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not (Path(args.dir) / "manifest.json").is_file():
        raise SystemExit(f"no checkpoint in {args.dir}: run bench/deit_idle.py once to build it")
    torch.manual_seed(0)
    net, _ = snnet_core.load(args.dir)
    net.eval()
    runners = {
        "shared": ProcessRunner(net, torch.float32, args.threads, (1, 8), max_batch=8),
        "bytes": ProcessRunner(net, torch.float32, args.threads, (1, 8), max_batch=0),
    }
    torch.set_num_threads(1)  # as the server's own process, once its model process runs
    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for r in range(args.rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                runner = runners[name]
                for b in (1, 8):
                    x = torch.randn(b, *net.input_size)
                    for _ in range(args.runs if b == 1 else max(2, args.runs // 3)):
                        t0 = time.perf_counter()
                        runner(x, args.stitch)
                        call = (time.perf_counter() - t0) * 1e3
                        rows.setdefault((name, b), []).append((call, runner.last_forward_ms))
                        time.sleep(0.002)  # as between requests
    finally:
        for runner in runners.values():
            runner.close()
    size = "x".join(map(str, net.input_size))
    print(f"# {args.dir}, stitch {args.stitch}, {size} images, {args.threads} threads, "
          f"{args.rounds} alternating rounds")  # fmt: skip
    out: dict[str, dict[str, float]] = {}
    for (name, b), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        call = statistics.median(c for c, _ in v)
        fwd = statistics.median(f for _, f in v)
        hop = statistics.median(c - f for c, f in v)
        print(f"batch {b} {name:>6}: call {call:8.2f} ms  forward {fwd:8.2f} ms  hop {hop:6.2f} ms")
        out[f"{name}_{b}"] = {"call_ms": round(call, 2), "hop_ms": round(hop, 2)}
    for b in (1, 8):
        out[f"hop_ratio_{b}"] = round(out[f"bytes_{b}"]["hop_ms"] / out[f"shared_{b}"]["hop_ms"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
