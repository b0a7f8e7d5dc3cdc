"""Per-stitch latency of DeiT-Ti/S/B (random weights) on this machine, float32 and bfloat16.

    python bench/deit_latency.py [--batch-sizes 1,8] [--repeats 3] [--warmup 1] [--json out.json]

Prints a Markdown table: id, description, GFLOPs, then median ms per dtype and batch size.
Takes several minutes on a 2-core CPU (71 stitches x 2 dtypes x batch sizes).
"""

from __future__ import annotations

import argparse
import json

import torch

import snnet_core
from snnet_core.profile import _cpu_name

DEIT = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", help="also write all profiles to this file")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.manual_seed(0)
    net = snnet_core.build_snnet(DEIT).eval()
    costs = snnet_core.stitch_costs(net)
    profiles = {}
    for dtype in (torch.float32, torch.bfloat16):
        net = net.to(dtype)
        profiles[str(dtype)[6:]] = snnet_core.measure_latency(
            net, None, sizes, warmup=args.warmup, repeats=args.repeats, progress=True
        )
    print(
        f"CPU: {_cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median of {args.repeats} after {args.warmup} warm-up\n"
    )
    cols = [f"{d} b{b} ms" for d in profiles for b in sizes]
    print("| id | stitch | GFLOPs | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for s, c in zip(net.stitches, costs, strict=True):
        cells = [f"{profiles[d].latency_ms[s.id][b]:.1f}" for d in profiles for b in sizes]
        print(f"| {s.id} | {s.description} | {c.gflops:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({d: p.to_dict() for d, p in profiles.items()}, f, indent=1)


if __name__ == "__main__":
    main()
