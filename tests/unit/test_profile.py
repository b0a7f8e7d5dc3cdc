import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import snnet_core
from snnet_core import DeviceFingerprint, measure_latency, pareto_front, stitch_costs
from snnet_core.profile import _EXTRA_FORMULAS
from tests.conftest import TINY_NUM_STITCHES

DEIT = "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"


@pytest.fixture(scope="module")
def deit():
    torch.manual_seed(0)
    return snnet_core.build_snnet(DEIT).eval()


def test_deit_space_has_the_reference_71_stitches(deit):
    assert len(deit.stitches) == 71
    assert [s.description for s in deit.stitches[:3]] == [
        "deit_tiny[0:12]",
        "deit_small[0:12]",
        "deit_base[0:12]",
    ]
    assert deit.stitches[3].anchors == (0, 1) and deit.stitches[36].anchors == (0, 1)
    assert deit.stitches[37].anchors == (1, 2) and deit.stitches[70].anchors == (1, 2)
    assert "deit_tiny[0:5] -> deit_small[5:12]" in {s.description for s in deit.stitches}
    assert [len(p) for p in deit.stitch_layers] == [11, 11]


def test_deit_gflops_match_the_reference_within_1pct(deit):
    costs = stitch_costs(deit)
    g = [c.gflops for c in costs]
    for got, ref in zip(g[:3], [1.26, 4.61, 17.58], strict=True):
        assert abs(got - ref) / ref < 0.01, (got, ref)
    assert abs(min(g) - 1.26) / 1.26 < 0.01 and abs(max(g) - 18.34) / 18.34 < 0.01
    # Parameters of the anchors are the timm models' own counts.
    for i, m in enumerate(deit.anchors):
        assert costs[i].params_m == pytest.approx(
            sum(p.numel() for p in m.parameters()) / 1e6, abs=1e-6
        )


def test_summed_part_costs_equal_a_whole_forward_count(tiny_net):
    """Costs are summed per part; counting a whole stitched forward must give the same."""
    costs = stitch_costs(tiny_net)
    x = torch.zeros(1, *tiny_net.input_size)
    for s in [0, 2, 5, 12, TINY_NUM_STITCHES - 1]:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as c:
            tiny_net(x, s)
        assert costs[s].gflops == pytest.approx(c.get_total_flops() / 2e9, rel=1e-6)


def test_counts_include_attention_on_cpu():
    m = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as c:
        m(torch.zeros(1, 3, 224, 224))
    attn_macs = 12 * 2 * 197 * 197 * 192
    assert c.get_total_flops() / 2 > 1.2e9 > c.get_total_flops() / 2 - attn_macs


def test_latency_profile_covers_what_was_asked(tiny_net):
    prof = measure_latency(tiny_net, [0, 3, 22], [1, 4], warmup=1, repeats=3)
    assert set(prof.latency_ms) == {0, 3, 22}
    assert all(
        set(v) == {1, 4} and all(ms > 0 for ms in v.values()) for v in prof.latency_ms.values()
    )
    fp = prof.fingerprint
    assert (
        fp.device_type == "cpu" and fp.dtype == "float32" and fp.threads == torch.get_num_threads()
    )
    assert fp.torch == torch.__version__ and fp.device_name
    assert fp == DeviceFingerprint.current("cpu", torch.float32)
    assert fp != DeviceFingerprint.current("cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="unknown stitch id 99"):
        measure_latency(tiny_net, [99])


def test_pareto_front():
    costs = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0]
    acc = [70.0, 75.0, 74.0, 73.0, 80.0, 80.0]
    assert pareto_front(costs, acc) == [0, 1, 4]
    with pytest.raises(ValueError):
        pareto_front([1.0], [])
