"""Import of reference SN-Net release files, on files built here in the release's layout.

Each test makes random timm anchors, writes their tensors and random stitching layers under the
release's keys (original Swin layout included), imports the file, saves and reloads it as our
checkpoint, and checks every stitch id against a direct computation from the timm modules and
the raw stitching tensors, with the reference's own numbering re-derived here from its rules.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import types

import pytest
import timm
import torch
import torch.nn.functional as F

import snnet_core
from snnet_core.reference import ReferenceFormatError, convert_reference, read_state_dict
from tests.conftest import TINY_ANCHORS, TINY_OVERRIDES
from tests.unit.test_families import RESNET_OVERRIDES, SWIN, SWIN_OVERRIDES


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add overhead (see test_families)
    yield
    torch.set_num_threads(before)


class Opaque:
    """Something a weights-only unpickler must refuse."""


@contextlib.contextmanager
def yacs_while_saving():
    """``yacs.config.CfgNode`` as the official Swin script pickles its config beside the weights
    (a dict subclass with attributes), importable only inside this block: the files are read
    where yacs is not installed."""
    package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__new_allowed__"] = True

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module.CfgNode, package.config = CfgNode, module
    sys.modules |= {"yacs": package, "yacs.config": module}
    try:
        yield CfgNode
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


# --- the reference's numbering, from its rules --------------------------------------------------


def reference_stitches(depths, stages, overlap):
    """[(pair, stage, j, k, layer)] in reference id order after the anchors."""
    out = []
    for st in stages:
        for p in range(len(depths) - 1):
            f, b = depths[p][st], depths[p + 1][st]
            if f == b:  # paired: window 2, stride 1, a layer per window that adds cuts
                cfgs, layers, n = [], [], -1
                for i in range(f):
                    ids = range(i, min(i + 2, f))
                    new = [
                        (j, k)
                        for j in ids
                        for k in ids
                        if (j, k) not in cfgs and (overlap or j < k)
                    ]
                    n += bool(new)
                    cfgs += new
                    layers += [n] * len(new)
            else:  # unpaired: nearest interpolation; the t-th cut takes layer end[t]
                end = F.interpolate(torch.arange(f).float()[None, None], b).long().flatten()
                end = end.tolist()
                cfgs = [(j, i) for j in range(f) for i, e in enumerate(end) if e == j and j < i]
                layers = end[: len(cfgs)]
            out += [(p, st, j, k, ly) for (j, k), ly in zip(cfgs, layers, strict=True)]
    return out


def random_layers(stitches, width, slot_of, conv: bool, gen):
    """Random stitching tensors under the release's keys; width(anchor, stage) -> channels."""
    raw = {}
    for p, st, _, _, layer in stitches:
        prefix = f"stitch_layers.{slot_of(st)}{p}.{layer}.transform."
        if prefix + "weight" in raw:
            continue
        cin, cout = width(p, st), width(p + 1, st)
        shape = (cout, cin, 1, 1) if conv else (cout, cin)
        raw[prefix + "weight"] = torch.randn(*shape, generator=gen) / cin**0.5
        raw[prefix + "bias"] = torch.randn(cout, generator=gen) * 0.1
    return raw


def original_swin_keys(state, i, gen):
    """timm 1.0 Swin tensors under the original layout: patch merging at the end of the previous
    stage, a plain ``head``, and the index/mask buffers the original code saved."""
    out = {}
    for k, v in state.items():
        if m := re.match(r"layers\.(\d+)\.downsample\.(.+)", k):
            k = f"layers.{int(m[1]) - 1}.downsample.{m[2]}"
        out[f"anchors.{i}.{k.replace('head.fc.', 'head.')}"] = v
        if k.endswith("attn.relative_position_bias_table"):
            base = f"anchors.{i}.{k.removesuffix('relative_position_bias_table')}"
            out[base + "relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
            out[base.removesuffix("attn.") + "attn_mask"] = torch.randn(4, 4, 4, generator=gen)
    return out


# --- direct computations from the timm modules --------------------------------------------------


def vit_until(m, x, j):
    h = m.norm_pre(m._pos_embed(m.patch_embed(x)))
    for blk in m.blocks[: j + 1]:
        h = blk(h)
    return h


def vit_from(m, h, k):
    for blk in m.blocks[k:]:
        h = blk(h)
    return m.forward_head(h)  # the release's stitched DeiT routes skip the final norm


def swin_until(m, x, st, j):
    h = m.patch_embed(x)
    for s in range(st):
        h = m.layers[s](h)
    h = m.layers[st].downsample(h)
    for blk in m.layers[st].blocks[: j + 1]:
        h = blk(h)
    return h


def swin_from(m, h, st, k):
    for blk in m.layers[st].blocks[k:]:
        h = blk(h)
    for s in range(st + 1, len(m.layers)):
        h = m.layers[s](h)
    return m.forward_head(m.norm(h))


def resnet_until(m, x, st, j):
    h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
    layers = [m.layer1, m.layer2, m.layer3, m.layer4]
    for s in range(st):
        h = layers[s](h)
    for blk in layers[st][: j + 1]:
        h = blk(h)
    return h


def resnet_from(m, h, st, k):
    layers = [m.layer1, m.layer2, m.layer3, m.layer4]
    for blk in layers[st][k:]:
        h = blk(h)
    for s in range(st + 1, 4):
        h = layers[s](h)
    return m.forward_head(h)


def make_anchors(names, overrides, seed):
    torch.manual_seed(seed)
    return [timm.create_model(n, **o).eval() for n, o in zip(names, overrides, strict=True)]


def check_all_ids(net, anchors, stitches, raw, slot_of, x, until, back_from, conv: bool):
    """Every reference id of ``net`` equals the direct computation (atol for float reorderings)."""
    assert len(net.stitches) == len(anchors) + len(stitches)
    with torch.no_grad():
        for i, m in enumerate(anchors):
            assert torch.equal(net(x, i), m(x))
        for sid, (p, st, j, k, layer) in enumerate(stitches, start=len(anchors)):
            prefix = f"stitch_layers.{slot_of(st)}{p}.{layer}.transform."
            w, b = raw[prefix + "weight"], raw[prefix + "bias"]
            h = until(anchors[p], x, st, j)
            if conv:
                h = F.conv2d(h, w, b)
                if back_from[p + 1] is swin_from:  # the release flattens to (B, H*W, C) tokens
                    bsz, c, hh, ww = h.shape
                    h = h.reshape(bsz, c, -1).permute(0, 2, 1).reshape(bsz, hh, ww, c)
            else:
                h = h @ w.T + b
            expected = back_from[p + 1](anchors[p + 1], h, st, k)
            got = net(x, sid)
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (sid, p, st, j, k)


def import_round_trip(tmp_path, file_obj, family, names, overrides, input_size=None):
    path = tmp_path / "release.pth"
    with yacs_while_saving() as CfgNode:
        if family == "swin":  # the official save_checkpoint's layout, config included
            model = CfgNode({"TYPE": "swin", "DEPTHS": CfgNode({"T": [2, 2, 6, 2]})})
            file_obj = {**file_obj, "config": CfgNode({"MODEL": model}), "max_accuracy": 81.3}
        torch.save(file_obj, path)
    assert "yacs" not in sys.modules
    state, trusted = read_state_dict(path)
    assert not trusted
    net, report = convert_reference(
        state, family, anchors=names, overrides=overrides, input_size=input_size
    )
    snnet_core.save(net, tmp_path / "ckpt")
    loaded, manifest = snnet_core.load(tmp_path / "ckpt")
    return loaded, manifest, report


# --- the three release layouts ------------------------------------------------------------------


def test_deit_release_round_trip_and_final_norm_quirk(tmp_path, digits):
    names = TINY_ANCHORS.split(",")
    anchors = make_anchors(names, TINY_OVERRIDES, seed=1)
    stitches = reference_stitches([[4]] * 3, [0], overlap=True)
    gen = torch.Generator().manual_seed(0)
    raw = {f"anchors.{i}.{k}": v for i, m in enumerate(anchors) for k, v in m.state_dict().items()}
    raw |= random_layers(stitches, lambda a, st: anchors[a].embed_dim, lambda st: "", False, gen)
    net, manifest, report = import_round_trip(
        tmp_path, {"model": raw}, "deit", names, TINY_OVERRIDES
    )
    assert report.tensors == len(raw) and report.skipped == []
    assert manifest.config.space.stitched_final_norm is False

    def until(m, x, st, j):
        return vit_until(m, x, j)

    def back(m, h, st, k):
        return vit_from(m, h, k)

    x = digits[0][:4]
    check_all_ids(net, anchors, stitches, raw, lambda st: "", x, until, [back] * 3, conv=False)
    # The flag is what makes stitched routes differ from our usual semantics.
    normal = snnet_core.SNNet(list(net.anchors), snnet_core.SNNetConfig(net.config.anchors))
    normal.stitch_layers = net.stitch_layers
    with torch.no_grad():
        assert torch.equal(normal(x, 0), net(x, 0))
        assert not torch.allclose(normal(x, 5), net(x, 5))


def test_swin_release_round_trip_from_the_original_layout(tmp_path, digits):
    names = SWIN.split(",")
    anchors = make_anchors(names, SWIN_OVERRIDES, seed=2)
    depths = [[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]]
    stitches = reference_stitches(depths, [0, 1, 2], overlap=False)
    assert len(stitches) == 38
    gen = torch.Generator().manual_seed(0)
    raw = {}
    for i, m in enumerate(anchors):
        raw |= original_swin_keys(m.state_dict(), i, gen)
    raw |= random_layers(
        stitches,
        lambda a, st: anchors[a].feature_info[st]["num_chs"],
        lambda st: f"{st}.",
        False,
        gen,
    )
    net, manifest, report = import_round_trip(
        tmp_path, {"model": raw}, "swin", names, SWIN_OVERRIDES
    )
    assert manifest.config.space.stitched_final_norm is True
    assert manifest.config.space.unpaired_layers == "reference"
    dropped = [k for k in raw if "relative_position_index" in k or "attn_mask" in k]
    assert sorted(report.skipped) == sorted(dropped) and report.tensors == len(raw) - len(dropped)
    # The documented layer mapping: (stage, pair, layer) -> our pair's layer offset + layer.
    offsets = {(0, 0): 0, (0, 1): 1, (0, 2): 2, (1, 0): 0, (1, 1): 1, (1, 2): 2}
    for p, st, _, _, layer in stitches:
        ours = net.stitch_layers[p][offsets[(p, st)] + layer].transform.weight
        assert torch.equal(ours, raw[f"stitch_layers.{st}.{p}.{layer}.transform.weight"])
    # Patch merging moved from the end of stage s to the start of stage s + 1.
    assert torch.equal(
        net.anchors[1].layers[3].downsample.reduction.weight,
        raw["anchors.1.layers.2.downsample.reduction.weight"],
    )
    x = F.interpolate(digits[0][:2], size=64, mode="bilinear")
    check_all_ids(
        net,
        anchors,
        stitches,
        raw,
        lambda st: f"{st}.",
        x,
        swin_until,
        [swin_from] * 3,
        conv=False,
    )


@pytest.mark.parametrize("back", ["resnet50", "swin_tiny_patch4_window7_224"])
def test_resnet_release_round_trip(tmp_path, digits, back):
    to_swin = back.startswith("swin")
    names = ["resnet18", back]
    overrides = [RESNET_OVERRIDES, SWIN_OVERRIDES[0] if to_swin else RESNET_OVERRIDES]
    anchors = make_anchors(names, overrides, seed=3)
    depths = [[2, 2, 2, 2], [2, 2, 6, 2] if to_swin else [3, 4, 6, 3]]
    stitches = reference_stitches(depths, [1, 2], overlap=False)
    assert len(stitches) == (6 if to_swin else 8)
    gen = torch.Generator().manual_seed(0)
    raw = {f"anchors.0.{k}": v for k, v in anchors[0].state_dict().items()}
    if to_swin:  # timm 0.6's Swin: the original layout
        raw |= original_swin_keys(anchors[1].state_dict(), 1, gen)
    else:
        raw |= {f"anchors.1.{k}": v for k, v in anchors[1].state_dict().items()}

    def width(a, st):  # ResNet's feature_info starts with the stem, Swin's with stage 0
        return anchors[a].feature_info[st + (1 if names[a] == "resnet18" or not to_swin else 0)][
            "num_chs"
        ]

    raw |= random_layers(stitches, width, lambda st: f"{st - 1}.", True, gen)
    # timm's training script saves its argparse namespace next to the weights.
    file_obj = {"state_dict": raw, "args": argparse.Namespace(model="snnet"), "epoch": 29}
    net, manifest, report = import_round_trip(
        tmp_path, file_obj, "resnet", None, overrides, None if to_swin else [1, 32, 32]
    )
    assert report.anchors == names
    size = 64 if to_swin else 32
    x = F.interpolate(digits[0][:2], size=size, mode="bilinear")
    backs = [resnet_from, swin_from if to_swin else resnet_from]
    check_all_ids(
        net, anchors, stitches, raw, lambda st: f"{st - 1}.", x, resnet_until, backs, conv=True
    )


# --- refusals -----------------------------------------------------------------------------------


def test_objects_beside_the_weights_are_read_as_inert_stand_ins(tmp_path, caplog):
    path = tmp_path / "odd.pth"
    with yacs_while_saving() as CfgNode:
        torch.save({"model": {"anchors.0.x": torch.zeros(1)}, "config": CfgNode({"A": 1})}, path)
    caplog.set_level("INFO", logger="snnet.reference")
    state, trusted = read_state_dict(path)  # no yacs, no trust needed
    assert not trusted and list(state) == ["anchors.0.x"]
    assert "ignored what the weights do not need: yacs.config.CfgNode" in caplog.text


def test_weights_that_need_arbitrary_classes_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {"anchors.0.x": Opaque()}}, path)
    with pytest.raises(
        ReferenceFormatError, match=r"weights_only=True\) \(it names .*Opaque.*--trust-pickle"
    ):
        read_state_dict(path)
    with pytest.raises(ReferenceFormatError, match="entry 'anchors.0.x' is a Opaque, not a tensor"):
        read_state_dict(path, trust_pickle=True)  # read in full, then refused for what it is


def test_foreign_or_incomplete_files_name_the_keys(tmp_path):
    names = TINY_ANCHORS.split(",")
    anchors = make_anchors(names, TINY_OVERRIDES, seed=1)
    raw = {f"anchors.{i}.{k}": v for i, m in enumerate(anchors) for k, v in m.state_dict().items()}
    with pytest.raises(ReferenceFormatError, match=r"missing \['stitch_layers\.0\.0\."):
        convert_reference(raw, "deit", anchors=names, overrides=TINY_OVERRIDES)
    with pytest.raises(ReferenceFormatError, match="unexpected key 'optimizer.state'"):
        convert_reference(
            {**raw, "optimizer.state": torch.zeros(1)},
            "deit",
            anchors=names,
            overrides=TINY_OVERRIDES,
        )
    with pytest.raises(ReferenceFormatError, match="unknown reference family 'levit'"):
        convert_reference(raw, "levit")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint" * 4)
    with pytest.raises(ReferenceFormatError, match="is not a readable PyTorch file"):
        read_state_dict(tmp_path / "junk.pth", trust_pickle=True)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ReferenceFormatError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_what_is_plainly_no_release_file_is_named(tmp_path, tiny_net):
    """An image, a folder, or our own checkpoint passed to `snnet import`: said as such (torch
    said "A load persistent id instruction was encountered", or listed missing keys)."""
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "digit.png")
    with pytest.raises(ReferenceFormatError, match=r"digit.png is a PNG image, not a PyTorch"):
        read_state_dict(tmp_path / "digit.png")
    snnet_core.save(tiny_net, tmp_path / "ours")
    ours = str(tmp_path / "ours")
    for path in (tmp_path / "ours", tmp_path / "ours" / "model.safetensors"):
        with pytest.raises(
            ReferenceFormatError,
            match=rf"is an snnet checkpoint already: serve it \(SNNET_WEIGHTS={re.escape(ours)}\) "
            rf"or fine-tune it \(snnet train --weights {re.escape(ours)}\)",
        ):
            read_state_dict(path)
    with pytest.raises(ReferenceFormatError, match="is a directory; snnet import converts one"):
        read_state_dict(tmp_path)
