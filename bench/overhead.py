"""SN-Net forward at an anchor id versus the bare timm model: same input, same dtype, one run.

    python bench/overhead.py [--rounds 30] [--batch 1]

Prints one line per (anchor, dtype): median ms of each and the ratio (target <= 1.02).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved_medians  # noqa: E402

import snnet_core  # noqa: E402

DEIT = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = snnet_core.build_snnet(DEIT).eval()
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, {args.rounds} rounds"
    )
    print(f"{'anchor':<24}{'dtype':<10}{'timm ms':>10}{'snnet ms':>10}{'ratio':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        net = net.to(dtype)
        for i, name in enumerate(DEIT):
            bare = timm.create_model(name, pretrained=False).eval().to(dtype)
            bare.load_state_dict(net.anchors[i].state_dict())
            x = torch.randn(args.batch, 3, 224, 224).to(dtype)
            with torch.inference_mode():
                assert torch.equal(bare(x), net(x, i))
                med = interleaved_medians(
                    {"timm": lambda b=bare, x=x: b(x), "snnet": lambda n=net, x=x, i=i: n(x, i)},
                    args.rounds,
                )
            print(
                f"{name:<24}{str(dtype)[6:]:<10}{med['timm']:>10.2f}{med['snnet']:>10.2f}{med['snnet'] / med['timm']:>8.3f}"
            )


if __name__ == "__main__":
    main()
