"""Does switching stitch between calls cost anything? (No re-allocation, no weight copies.)

    python bench/switching.py [--rounds 40]

For a few stitches of DeiT-Ti/S/B (fp32, batch 1), times stitch A when the previous call ran A
("same") and when it ran another stitch B ("switched"), interleaved in one run, and checks that
no parameter moved or was copied (data pointers and the process's parameter bytes unchanged).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import snnet_core

DEIT = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = snnet_core.build_snnet(DEIT).eval()
    x = torch.randn(1, 3, 224, 224)
    pointers = {n: p.data_ptr() for n, p in net.named_parameters()}
    pairs = [(0, 1), (3, 20), (20, 40), (1, 50)]  # (measured A, other B)
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 batch 1, {args.rounds} rounds"
    )
    print(f"{'A':>4}{'B':>4}  {'same ms':>9}{'switched ms':>13}{'ratio':>8}")
    with torch.inference_mode():
        for a, b in pairs:
            for _ in range(3):
                net(x, a), net(x, b)
            same, switched = [], []
            for _ in range(args.rounds):
                net(x, a)  # previous call: A
                t0 = time.perf_counter()
                net(x, a)
                same.append(time.perf_counter() - t0)
                net(x, b)  # previous call: B
                t0 = time.perf_counter()
                net(x, a)
                switched.append(time.perf_counter() - t0)
            ms_same, ms_sw = statistics.median(same) * 1e3, statistics.median(switched) * 1e3
            print(f"{a:>4}{b:>4}  {ms_same:>9.2f}{ms_sw:>13.2f}{ms_sw / ms_same:>8.3f}")
    moved = [n for n, p in net.named_parameters() if p.data_ptr() != pointers[n]]
    print(f"parameters moved or copied by switching: {len(moved)} of {len(pointers)}")


if __name__ == "__main__":
    main()
