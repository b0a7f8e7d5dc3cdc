"""Per-stitch invariants of the Swin, ResNet and ResNet -> Swin families.

Real timm architectures with the reference depths (so the stitch spaces are the real 41 / 10 / 8),
narrowed and fed 32x32 (ResNet) or 64x64 (Swin) single-channel inputs so that every stitch runs forward and backward in
milliseconds; full-size counts and GFLOPs are in ``test_families_full.py``.
"""

from __future__ import annotations

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import snnet_core
from snnet_core import adapter_for

SWIN = "swin_tiny_patch4_window7_224,swin_small_patch4_window7_224,swin_base_patch4_window7_224"
# Window 2 over a 16x16 patch grid keeps shifted windows and masks in play in stages 0-2, and
# stage 3 (2x2) still has a relative position bias that matters (a 1x1 grid would not).
# No drop-path (timm's Swin default is 0.1): a dropped block gets no gradient at random.
SWIN_COMMON = {
    "img_size": 64,
    "in_chans": 1,
    "num_classes": 10,
    "window_size": 2,
    "drop_path_rate": 0.0,
}
SWIN_HEADS = {"num_heads": (1, 2, 4, 8)}
SWIN_OVERRIDES = [
    {**SWIN_COMMON, **SWIN_HEADS, "embed_dim": 16},
    {**SWIN_COMMON, **SWIN_HEADS, "embed_dim": 16},
    {**SWIN_COMMON, **SWIN_HEADS, "embed_dim": 24},
]
# timm zero-initialises each block's last BN; with it a random ResNet's residual branches get no
# gradient at all, which would hide the parameters a route really uses.
RESNET_OVERRIDES = {"in_chans": 1, "num_classes": 10, "zero_init_last": False}

FAMILIES = {
    "swin": (SWIN, SWIN_OVERRIDES, None, 41),
    "resnet": ("resnet18,resnet50", RESNET_OVERRIDES, (1, 32, 32), 10),
    "resnet_swin": (
        "resnet18,swin_tiny_patch4_window7_224",
        [RESNET_OVERRIDES, SWIN_OVERRIDES[0]],
        None,
        8,
    ),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are all tiny ops; splitting each over threads costs far more than it saves
    (on a busy 2-core machine a Swin stitch's backward took seconds with 2 threads, 50 ms with
    one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(family: str, seed: int = 0) -> snnet_core.SNNet:
    anchors, overrides, input_size, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return snnet_core.build_snnet(anchors, overrides=overrides, input_size=input_size)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_net(request):
    return request.param, build(request.param)


@pytest.fixture(scope="module")
def images(family_net, digits, train_digits):
    """Real MNIST digits upsampled to the net's input size: (held-out, train)."""
    size = family_net[1].input_size[1:]

    def up(x):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return up(digits[0]), up(train_digits)


def part_of(name: str) -> tuple:
    """Where an anchor parameter sits: ("stem",), ("head",), ("down", stage) or
    ("block", stage, block), from its timm name alone."""
    if m := re.match(r"layers\.(\d+)\.downsample\.", name):  # Swin (timm 1.0: start of stage)
        return ("down", int(m[1]))
    if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name):  # Swin
        return ("block", int(m[1]), int(m[2]))
    if m := re.match(r"layer(\d)\.(\d+)\.", name):  # ResNet
        return ("block", int(m[1]) - 1, int(m[2]))
    if name.startswith(("patch_embed.", "conv1.", "bn1.")):
        return ("stem",)
    if name.startswith(("norm.", "head.", "fc.")):
        return ("head",)
    raise AssertionError(f"unexpected parameter {name}")


def expected_params(net, stitch_id: int) -> set[str]:
    s = net.stitches[stitch_id]
    names = [n for n, _ in net.named_parameters()]
    if s.is_anchor:
        return {n for n in names if n.startswith(f"anchors.{s.anchors[0]}.")}
    (a, b), st, (j, k) = s.anchors, s.stage, s.stage_cut
    used = set()
    for n in names:
        if n.startswith(f"stitch_layers.{s.pair}.{s.layer}."):
            used.add(n)
            continue
        m = re.match(r"anchors\.(\d+)\.(.+)", n)
        if m is None:
            continue
        i, part = int(m[1]), part_of(m[2])
        kind, where = part[0], part[1:]
        # Front: stem, earlier stages, this stage's downsampling and blocks 0..j.
        front = (
            kind == "stem"
            or (kind == "down" and where[0] <= st)
            or (kind == "block" and (where[0] < st or (where[0] == st and where[1] <= j)))
        )
        # Back: this stage's blocks k.., later stages (downsampling included), head.
        back = (
            kind == "head"
            or (kind == "down" and where[0] > st)
            or (kind == "block" and tuple(where) >= (st, k))
        )
        if (i == a and front) or (i == b and back):
            used.add(n)
    return used


def test_every_stitch_shape_finite_and_gradients_exactly_where_used(family_net, images):
    family, net = family_net
    net.train()
    x = images[0][:2]
    assert len(net.stitches) == FAMILIES[family][3]
    for s in net.stitches:
        net.zero_grad(set_to_none=True)
        out = net(x, s.id)
        assert out.shape == (2, 10), s
        assert torch.isfinite(out).all(), s
        out.square().mean().backward()
        got = {
            n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }
        assert got == expected_params(net, s.id), s.description
    net.eval()


def test_anchor_ids_reproduce_the_timm_models_bit_for_bit(family_net, images):
    _, net = family_net
    net.eval()  # (a new net is in training mode: batch statistics, not the running ones)
    x = images[0][:8]
    for i, spec in enumerate(net.config.anchors):
        ref = timm.create_model(spec.name, pretrained=False, **spec.overrides).eval()
        ref.load_state_dict(net.anchors[i].state_dict())
        with torch.no_grad():
            assert torch.equal(net(x, i), ref(x))


def test_adapter_decomposition_equals_model_forward(family_net, images):
    _, net = family_net
    x = images[0][:8]
    for m in net.anchors:
        ad = adapter_for(m)
        with torch.no_grad():
            h = ad.stem(m, x)
            for u in ad.units(m):
                h = u(h)
            assert torch.equal(ad.head(m, h), m(x))


def test_cuts_fall_inside_the_reference_stages(family_net):
    family, net = family_net
    allowed = {"swin": {0, 1, 2}, "resnet": {1, 2}, "resnet_swin": {1, 2}}[family]
    stitched = [s for s in net.stitches if not s.is_anchor]
    assert {s.stage for s in stitched} == allowed
    assert all(s.stage_cut[0] < s.stage_cut[1] for s in stitched)


def test_least_squares_init_lowers_the_error_at_the_cut(family_net, images):
    family, net = family_net
    held, train = images
    net.eval()
    feats = [net.unit_features(i, held) for i in range(len(net.anchors))]

    def cut_errors():
        errs = []
        for s in net.stitches[len(net.anchors) :]:
            (a, b), (j, k) = s.anchors, s.cut
            with torch.no_grad():
                y = net.stitch_layers[s.pair][s.layer](feats[a][j + 1])
            errs.append(((y - feats[b][k]) ** 2).mean().item())
        return torch.tensor(errs)

    before = cut_errors()
    net.init_stitching_layers(train)
    after = cut_errors()
    assert (after < before).all(), (family, before, after)
    assert after.mean() < 0.5 * before.mean()


def test_resnet_to_swin_layer_maps_a_feature_map_to_channels_last_tokens():
    net = build("resnet_swin")
    layer = net.stitch_layers[0][0]
    assert isinstance(layer.transform, torch.nn.Conv2d) and layer.transform.bias is not None
    out = layer(torch.randn(2, layer.in_dim, 4, 4))
    assert out.shape == (2, 4, 4, layer.out_dim)  # (B, H, W, C), what timm 1.0 Swin blocks take


def test_resnet_input_size_comes_from_the_config_and_survives_a_checkpoint(tmp_path):
    net = build("resnet")
    assert net.input_size == (1, 32, 32)
    manifest = snnet_core.save(net, tmp_path)
    assert manifest.preprocessing["input_size"] == [1, 32, 32]
    loaded, m2 = snnet_core.load(tmp_path)
    assert loaded.input_size == (1, 32, 32) and m2.config.input_size == (1, 32, 32)
    assert [s.description for s in loaded.stitches] == [s.description for s in net.stitches]


def test_mixing_families_with_different_grids_is_refused():
    with pytest.raises(ValueError, match="stitch 2 .* the front's features have layout"):
        snnet_core.build_snnet(
            "resnet18,swin_tiny_patch4_window7_224",
            # Patch 2 halves Swin's stride: its stage-1 grid is 8x8, ResNet's 4x4.
            overrides=[RESNET_OVERRIDES, {**SWIN_OVERRIDES[0], "patch_size": 2}],
        )


def test_summed_part_costs_equal_a_whole_forward_count(family_net):
    from torch.utils.flop_counter import FlopCounterMode

    from snnet_core.profile import _EXTRA_FORMULAS

    _, net = family_net
    net.eval()
    costs = snnet_core.stitch_costs(net)
    x = torch.zeros(1, *net.input_size)
    for s in {0, len(net.anchors), len(net.stitches) // 2, len(net.stitches) - 1}:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as c:
            net(x, s)
        assert costs[s].gflops == pytest.approx(c.get_total_flops() / 2e9, rel=1e-6)


def test_windowed_attention_is_counted_like_its_explicit_matmuls():
    """timm's Swin can run fused SDPA (a CPU kernel FlopCounterMode does not know by itself);
    both paths must give the count of the explicit matmuls."""
    from timm.models.swin_transformer import WindowAttention

    net = build("swin").eval()

    def count(fused: bool) -> float:
        for mod in net.anchors[0].modules():
            if isinstance(mod, WindowAttention):
                mod.fused_attn = fused
        return snnet_core.stitch_costs(net)[0].gflops

    assert count(True) == pytest.approx(count(False), rel=1e-9)


def test_declared_widths_and_grids_are_those_of_the_real_features(family_net, images):
    """Layers are sized and cuts checked from the adapter's declarations, without a forward."""
    _, net = family_net
    net.eval()
    for i, (m, ad) in enumerate(zip(net.anchors, net.adapters, strict=True)):
        for after, h in enumerate(net.unit_features(i, images[0][:1]), start=-1):
            hw, c = (
                (h.shape[-2:], h.shape[1]) if ad.layout == "nchw" else (h.shape[1:3], h.shape[-1])
            )
            assert ad.feature_width(m, after) == c, (i, after)
            assert ad.feature_grid(m, after, net.input_size)[1] == tuple(hw), (i, after)


def test_bfloat16_on_cpu_runs_every_stitch(family_net, images):
    family, net = family_net
    net.eval().to(torch.bfloat16)
    x = images[0][:2].bfloat16()
    try:
        with torch.no_grad():
            for s in net.stitches:
                out = net(x, s.id)
                assert out.dtype == torch.bfloat16 and torch.isfinite(out).all(), s
    finally:
        net.float()


def test_an_input_size_a_fixed_size_anchor_was_not_built_for_says_how_to_build_it():
    """ResNet takes --input-size; Swin is built for one size, and the error named neither the
    anchor nor the override that shrinks it."""
    with pytest.raises(ValueError) as e:
        snnet_core.build_snnet("resnet18,swin_tiny_patch4_window7_224", input_size=(3, 64, 64))
    assert "swin_tiny_patch4_window7_224 is built for one size: give its own in --overrides " \
        '(a list, one object per anchor), e.g. {"img_size": 64}' in str(e.value)  # fmt: skip
    net = snnet_core.build_snnet(
        "resnet18,swin_tiny_patch4_window7_224", input_size=(3, 64, 64),
        overrides=[{}, {"img_size": 64, "window_size": 2}],
    )  # fmt: skip
    assert net.input_size == (3, 64, 64) and len(net.stitches) == 8
