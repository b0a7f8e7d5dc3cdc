"""Full-size Swin-T/S/B, ResNet-18/50 and ResNet-18 -> Swin-T (random weights): the reference's
stitch counts and GFLOPs ranges (fvcore figures of the SN-Net paper), each family built and
counted once."""

from __future__ import annotations

import pytest
import torch

import snnet_core
from snnet_core import stitch_costs

pytestmark = pytest.mark.slow

SWIN = "swin_tiny_patch4_window7_224,swin_small_patch4_window7_224,swin_base_patch4_window7_224"
# family -> (anchors, stitches, reference GFLOPs of the anchors, reference range)
REFERENCE = {
    "swin": (SWIN, 41, [4.51, 8.77, 15.47], (4.51, 15.47)),
    "resnet": ("resnet18,resnet50", 10, [1.82, 4.11], (1.82, 4.11)),
    "resnet_swin": ("resnet18,swin_tiny_patch4_window7_224", 8, [1.82, 4.51], (1.82, 4.51)),
}


@pytest.fixture(scope="module", params=sorted(REFERENCE))
def counted(request):
    anchors = REFERENCE[request.param][0]
    torch.manual_seed(0)
    net = snnet_core.build_snnet(anchors).eval()
    return request.param, net, stitch_costs(net)


def close(got: float, ref: float) -> bool:
    return abs(got - ref) / ref < 0.02


def test_reference_stitch_counts_and_gflops_within_2pct(counted):
    family, net, costs = counted
    _, count, anchor_gflops, (lo, hi) = REFERENCE[family]
    assert len(net.stitches) == len(costs) == count
    g = [c.gflops for c in costs]
    for got, ref in zip(g, anchor_gflops, strict=False):
        assert close(got, ref), (family, got, ref)
    assert close(min(g), lo) and close(max(g), hi), (family, min(g), max(g))
    # Parameters of the anchors are the timm models' own counts.
    for i, m in enumerate(net.anchors):
        assert costs[i].params_m == pytest.approx(
            sum(p.numel() for p in m.parameters()) / 1e6, abs=1e-6
        )


def test_stitched_routes_cost_between_their_parts(counted):
    """A stitch costs at least its front's stem and at most the sum of both anchors."""
    _, net, costs = counted
    for s in net.stitches[len(net.anchors) :]:
        a, b = s.anchors
        assert 0 < costs[s.id].gflops < costs[a].gflops + costs[b].gflops
