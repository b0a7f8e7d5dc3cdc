"""Per-stitch invariants of an SN-Net over a tiny real timm ViT family."""

import threading

import pytest
import timm
import torch

import snnet_core
from snnet_core import adapter_for
from tests.conftest import TINY_ANCHORS, TINY_NUM_STITCHES, TINY_OVERRIDES, build_tiny

HEAD_PARTS = ("norm.", "fc_norm.", "head.")


def expected_params(net, stitch_id):
    """Names of the parameters a stitch uses, derived from names alone."""
    s = net.stitches[stitch_id]
    names = [n for n, _ in net.named_parameters()]
    if s.is_anchor:
        return {n for n in names if n.startswith(f"anchors.{s.anchors[0]}.")}
    (a, b), (j, k) = s.anchors, s.cut
    used = set()
    for n in names:
        if n.startswith(f"anchors.{a}."):
            rest = n[len(f"anchors.{a}.") :]
            if rest.startswith("blocks."):
                if int(rest.split(".")[1]) <= j:
                    used.add(n)
            elif not rest.startswith(HEAD_PARTS):
                used.add(n)  # stem: patch embed, cls token, pos embed
        elif n.startswith(f"anchors.{b}."):
            rest = n[len(f"anchors.{b}.") :]
            if (
                rest.startswith("blocks.")
                and int(rest.split(".")[1]) >= k
                or rest.startswith(HEAD_PARTS)
            ):
                used.add(n)
        elif n.startswith(f"stitch_layers.{s.pair}.{s.layer}."):
            used.add(n)
    return used


def test_tiny_family_size(tiny_net):
    assert len(tiny_net.stitches) == TINY_NUM_STITCHES
    assert tiny_net.input_size == (1, 28, 28)


@pytest.mark.parametrize("stitch_id", range(TINY_NUM_STITCHES))
def test_every_stitch_shape_finite_and_gradients_exactly_where_used(stitch_id, digits):
    net = build_tiny().train()
    x = digits[0][:4]
    out = net(x, stitch_id)
    assert out.shape == (4, 10)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    got = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == expected_params(net, stitch_id)


@pytest.mark.parametrize("anchor", range(3))
def test_anchor_ids_reproduce_the_timm_models_bit_for_bit(anchor, digits):
    net = build_tiny(seed=anchor).eval()
    ref = timm.create_model(
        net.anchor_names[anchor], pretrained=False, **TINY_OVERRIDES[anchor]
    ).eval()
    ref.load_state_dict(net.anchors[anchor].state_dict())
    x = digits[0]
    with torch.no_grad():
        assert torch.equal(net(x, anchor), ref(x))
        net_bf, ref_bf = net.to(torch.bfloat16), ref.to(torch.bfloat16)
        assert torch.equal(net_bf(x.bfloat16(), anchor), ref_bf(x.bfloat16()))


@pytest.mark.parametrize("anchor", range(3))
def test_adapter_decomposition_equals_model_forward(anchor, tiny_net, digits):
    """stem -> units -> head is the timm forward, op for op: stitched routes are built from it."""
    m = tiny_net.anchors[anchor]
    ad = adapter_for(m)
    with torch.no_grad():
        h = ad.stem(m, digits[0])
        for u in ad.units(m):
            h = u(h)
        assert torch.equal(ad.head(m, h), m(digits[0]))


def test_route_is_an_argument_so_threads_can_share_one_net(tiny_net, digits):
    x = digits[0][:8]
    with torch.no_grad():
        expected = {s: tiny_net(x, s) for s in range(TINY_NUM_STITCHES)}
    results, errors = {}, []

    def worker(ids):
        try:
            for _ in range(3):
                for s in ids:
                    with torch.no_grad():
                        results[(s, threading.get_ident())] = tiny_net(x, s)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(list(range(i, TINY_NUM_STITCHES, 4)),))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == TINY_NUM_STITCHES
    for (s, _), out in results.items():
        assert torch.equal(out, expected[s])


def test_bfloat16_on_cpu_runs_every_stitch(tiny_net, digits):
    net = tiny_net.to(torch.bfloat16)
    x = digits[0][:4].bfloat16()
    with torch.no_grad():
        for s in range(TINY_NUM_STITCHES):
            out = net(x, s)
            assert (
                out.dtype == torch.bfloat16 and out.shape == (4, 10) and torch.isfinite(out).all()
            )


def test_unknown_stitch_id_names_the_valid_range(tiny_net, digits):
    with pytest.raises(ValueError, match=r"unknown stitch id 23; valid ids are 0\.\.22"):
        tiny_net(digits[0][:1], 23)
    with pytest.raises(ValueError, match="unknown stitch id -1"):
        tiny_net(digits[0][:1], -1)
    with pytest.raises(TypeError, match="stitch_id must be an int"):
        tiny_net(digits[0][:1], 1.5)


def test_least_squares_init_lowers_the_error_at_the_cut(train_digits, digits):
    net = build_tiny(seed=3).eval()
    held = digits[0]

    def cut_errors():
        errs = []
        for s in net.stitches:
            if s.is_anchor:
                continue
            (a, b), (j, k) = s.anchors, s.cut
            x = net.unit_features(a, held)[j + 1]
            y = net.unit_features(b, held)[k]
            with torch.no_grad():
                errs.append(((net.stitch_layers[s.pair][s.layer](x) - y) ** 2).mean().item())
        return torch.tensor(errs)

    before = cut_errors()
    net.init_stitching_layers(train_digits)
    after = cut_errors()
    assert (after < before).all(), (before, after)
    assert after.mean() < 0.5 * before.mean()


def test_least_squares_solution_recovers_an_exact_affine_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    w, b = torch.randn(5, 8, generator=g), torch.randn(5, generator=g)
    w_hat, b_hat = snnet_core.least_squares_affine(x, x @ w.T + b)
    assert torch.allclose(w_hat, w, atol=1e-4) and torch.allclose(b_hat, b, atol=1e-4)


def test_build_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 anchors"):
        snnet_core.build_snnet("vit_tiny_patch16_224", overrides=TINY_OVERRIDES[0])
    with pytest.raises(ValueError, match="unknown timm model 'no_such_model'"):
        snnet_core.build_snnet("no_such_model,vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="one per anchor"):
        snnet_core.build_snnet(TINY_ANCHORS, overrides=TINY_OVERRIDES[:2])
    bad = [dict(o) for o in TINY_OVERRIDES]
    bad[1]["num_classes"] = 7
    with pytest.raises(ValueError, match="num_classes"):
        snnet_core.build_snnet(TINY_ANCHORS, overrides=bad)
    with pytest.raises(ValueError, match="no SN-Net family adapter for MobileNetV3"):
        snnet_core.build_snnet("mobilenetv3_small_050,mobilenetv3_small_075")
    # Large to small: stitches join small fronts to large backs, so the order is named.
    names = TINY_ANCHORS.split(",")
    with pytest.raises(ValueError, match=rf"small to large: {names[2]} \([0-9,]+ parameters\) "
                       rf"is given before {names[1]} .*; give them as {TINY_ANCHORS} \(and their "
                       r"overrides in the same order\)"):  # fmt: skip
        snnet_core.build_snnet(names[::-1], overrides=TINY_OVERRIDES[::-1])


def test_an_anchor_says_what_it_is_and_old_configs_still_load():
    from snnet_core.snnet import SNNetConfig

    old = {"anchors": [{"name": "vit_tiny_patch16_224", "overrides": {"embed_dim": 8, "depth": 6,
                                                                        "class_token": False}}]}  # fmt: skip
    a = SNNetConfig.from_dict(old).anchors[0]
    # Without a display name: the timm name and the overrides that change the architecture.
    assert a.title == "vit_tiny_patch16_224 with embed_dim=8, depth=6"
    assert "display_name" not in SNNetConfig.from_dict(old).to_dict()["anchors"][0]
    named = {"anchors": [{**old["anchors"][0], "display_name": "ViT, width 8"}]}
    config = SNNetConfig.from_dict(named)
    assert config.anchors[0].title == "ViT, width 8"
    assert SNNetConfig.from_dict(config.to_dict()) == config  # round trip
    with pytest.raises(ValueError, match="display_name must be a string"):
        SNNetConfig.from_dict({"anchors": [{**old["anchors"][0], "display_name": 8}]})
