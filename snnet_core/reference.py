"""Import the reference SN-Net release checkpoints (ziplab/SN-Net) into an ``SNNet``.

The release files are PyTorch pickles of a state dict with keys ``anchors.{i}.<anchor keys>``
and ``stitch_layers...transform.{weight,bias}``:

====== ============================= ================================================ ============
family anchors                       stitching-layer keys                             dict key
====== ============================= ================================================ ============
deit   DeiT-Ti/S/B (timm ViT keys)   ``stitch_layers.{pair}.{layer}``                 ``model``
swin   Swin-T/S/B (original Swin     ``stitch_layers.{stage}.{pair}.{layer}``,        ``model``
       keys: patch merging at the    stage 0-2
       end of stages 0-2)
resnet ResNet-18/50, or ResNet-18 -> ``stitch_layers.{stage - 1}.{pair}.{layer}``,    ``state_dict``
       Swin-T (timm 0.6 keys)        stage 1-2, 1x1 conv weights
====== ============================= ================================================ ============

Stitch ids: our enumeration (``space.py``) follows the reference's order (anchors; then stage
by stage, pair by pair, each pair's cuts in the reference's discovery order), so **reference id
i is our id i** for all three families; tests check every id against a direct computation from
the raw file. Stitching layers: ours are numbered per pair across stages, so reference layer
``(stage, pair, layer)`` becomes our ``stitch_layers.{pair}.{offset + layer}``, where ``offset``
is the number of that pair's layers in earlier cut stages (Swin-T->S: stage 0 -> 0, stage 1 ->
1, stage 2 -> 2..7; Swin-S->B: 0, 1, 2..18; ResNet-18->50: stage 1 -> 0..1, stage 2 -> 2..3;
ResNet-18->Swin-T: stage 1 -> 0, stage 2 -> 1..2). DeiT layer keys are the same as ours.

Route semantics: the reference DeiT applies the back anchor's final LayerNorm only on anchor
routes, not on stitched ones; imported DeiT nets set ``SpaceConfig.stitched_final_norm = False``
(saved in the manifest) to reproduce that. Where a stage is stitched to a deeper one (Swin-T ->
S stage 2, ResNet) the release shares layers between unpaired stitches in its own way; imported
nets set ``SpaceConfig.unpaired_layers = "reference"`` to keep it (see
``space.unpaired_stitching``). Nets we build ourselves keep the usual semantics.

Pickles can run code when loaded. Files are read with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers (plus ``argparse.Namespace``, a plain attribute bag
the reference training scripts store next to the weights). The official Swin script also pickles
its yacs ``CfgNode`` config beside the weights, which that refuses; such files are read again
with every class the weights do not need replaced by an inert stand-in (nothing the file names
is imported or run), so neither ``yacs`` nor trust is needed. Only a file whose weights
themselves need arbitrary classes is refused unless the caller passes ``trust_pickle=True``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .snnet import AnchorSpec, SNNet, SNNetConfig, _per_anchor_overrides, snnet_from_config
from .space import SpaceConfig

REFERENCE_ANCHORS: dict[str, list[str]] = {
    "deit": ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"],
    "swin": [
        "swin_tiny_patch4_window7_224",
        "swin_small_patch4_window7_224",
        "swin_base_patch4_window7_224",
    ],
    "resnet": ["resnet18", "resnet50"],
}
RESNET_SWIN_ANCHORS = ["resnet18", "swin_tiny_patch4_window7_224"]


log = logging.getLogger("snnet.reference")


class ReferenceFormatError(ValueError):
    """A file that is not a reference SN-Net checkpoint we can convert; says what is wrong."""


@dataclass
class ImportReport:
    """What an import did, for the manifest and the user."""

    family: str
    anchors: list[str]
    tensors: int  # tensors read from the file and placed into the net
    skipped: list[str]  # file keys deliberately dropped (non-persistent buffers)
    trusted_pickle: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "anchors": self.anchors,
            "tensors": self.tensors,
            "skipped": self.skipped,
            "trusted_pickle": self.trusted_pickle,
            "stitch_ids": "identity (reference id i is stitch id i)",
        }


def read_state_dict(
    path: str | os.PathLike[str], trust_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors of a reference checkpoint file, and whether full unpickling was needed.

    Objects beside the weights that ``weights_only`` refuses (the Swin script's yacs config) are
    read as inert stand-ins, without trust; only weights that need arbitrary classes to rebuild
    need ``trust_pickle``.

    Raises:
        ReferenceFormatError: the file needs full unpickling and ``trust_pickle`` is False, or
            it holds no state dict.
    """
    if (other := _not_a_release(Path(path))) is not None:
        raise ReferenceFormatError(other)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        trusted = False
    except FileNotFoundError:
        raise ReferenceFormatError(f"{path} does not exist") from None
    except pickle.UnpicklingError as e:  # what torch raises for anything it will not rebuild
        obj, ignored = _load_with_stand_ins(path)
        trusted = False
        if _tensors_of(obj) is not None:  # the weights are plain tensors: what else is, is not read
            log.info("%s: ignored what the weights do not need: %s", path, ", ".join(ignored))
        elif not trust_pickle:
            raise ReferenceFormatError(
                f"{path} cannot be read with torch.load(weights_only=True) ({_why(str(e))}). "
                "It needs full unpickling, which runs whatever code the file names; only if you "
                "trust where it came from, pass --trust-pickle"
            ) from None
        else:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e2:  # a corrupt file fails here in many ways
                raise ReferenceFormatError(f"{path} is not a readable PyTorch file: {e2}") from None
            trusted = True
    obj = _state_of(obj)
    if not isinstance(obj, dict) or not obj:
        raise ReferenceFormatError(
            f"{path} holds no state dict (expected a dict of tensors, or one under 'model' or "
            f"'state_dict'), found {type(obj).__name__}"
        )
    state = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise ReferenceFormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        state[k.removeprefix("module.")] = v  # saved from a DDP wrapper
    return state, trusted


# The first bytes of files people pass by mistake (torch's own error for them reads "A load
# persistent id instruction was encountered").
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "gzip-compressed",
}
_RELEASE = "snnet import converts one release file of the reference implementation, e.g. " \
    "snnet_deit.pth"  # fmt: skip


def _not_a_release(path: Path) -> str | None:
    """Why ``path`` is plainly not a reference release file (a folder, our own checkpoint, an
    image), or None if it may be one."""
    ours = path if path.is_dir() else path.parent
    mine = path.is_dir() or path.name in ("model.safetensors", "manifest.json")
    if mine and (ours / "manifest.json").is_file() and (ours / "model.safetensors").is_file():
        return (
            f"{path} is an snnet checkpoint already: serve it (SNNET_WEIGHTS={ours}) or "
            f"fine-tune it (snnet train --weights {ours}); {_RELEASE}"
        )
    if path.is_dir():
        return f"{path} is a directory; {_RELEASE}"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None  # (torch.load says why)
    kind = next((what for magic, what in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None:
        return None
    if kind == "gzip-compressed":
        return f"{path} is gzip-compressed: unpack it first ({_RELEASE})"
    return f"{path} is {kind}, not a PyTorch checkpoint; {_RELEASE}"


def _state_of(obj: Any) -> Any:
    """The state dict inside a checkpoint object: DeiT/Swin scripts save 'model', timm's
    'state_dict'; else the object itself."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    return obj


def _tensors_of(obj: Any) -> dict | None:
    """The state dict if it holds only tensors, else None."""
    state = _state_of(obj)
    ok = (
        isinstance(state, dict)
        and state
        and all(isinstance(v, torch.Tensor) for v in state.values())
    )
    return state if ok else None


class _StandIn(dict):
    """Takes the place of a class the file names that rebuilding tensors does not need (yacs's
    ``CfgNode``, an optimizer's state class...): whatever the pickle passes it is kept as inert
    data; nothing of the named class is imported or run."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _StandIn:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def _tensor_globals() -> dict[str, Any]:
    """The globals ``torch.load(weights_only=True)`` rebuilds (tensors, storages, plain
    containers), by name."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # a torch without it: the rebuild functions it uses
        import collections

        allowed = {
            "collections.OrderedDict": collections.OrderedDict,
            "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
            "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
        }
    allowed["argparse.Namespace"] = argparse.Namespace
    return allowed


def _load_with_stand_ins(path: str | os.PathLike[str]) -> tuple[Any, list[str]]:
    """``torch.load`` with every global outside ``_tensor_globals`` replaced by ``_StandIn``;
    the object and the names replaced."""
    allowed, ignored = _tensor_globals(), []

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if full not in ignored:
                ignored.append(full)
            return _StandIn

    lenient = types.ModuleType("snnet_stand_in_pickle")
    lenient.Unpickler = Unpickler
    lenient.load = lambda f, **kw: Unpickler(f, **kw).load()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient)
    except Exception as e:  # a corrupt file fails here in many ways
        raise ReferenceFormatError(f"{path} is not a readable PyTorch file: {e}") from None
    return obj, ignored


def _why(message: str) -> str:
    """The useful line of torch's weights-only refusal."""
    if m := re.search(r"Unsupported global: GLOBAL (\S+)", message):
        return f"it names {m[1]}, which is not a tensor or plain container"
    tail = message.split("WeightsUnpickler error:", 1)[-1]
    return next((line.strip() for line in tail.splitlines() if line.strip()), "unknown reason")


def reference_anchors(family: str, state: dict[str, torch.Tensor]) -> list[str]:
    """The timm names of the release's anchors; the ResNet files come in two kinds."""
    if family not in REFERENCE_ANCHORS:
        raise ReferenceFormatError(
            f"unknown reference family {family!r}; choose one of {sorted(REFERENCE_ANCHORS)}"
        )
    if family == "resnet" and any(k.startswith("anchors.1.layers.") for k in state):
        return list(RESNET_SWIN_ANCHORS)
    return list(REFERENCE_ANCHORS[family])


def _anchor_state(
    net: SNNet, i: int, sub: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One anchor's tensors in timm 1.0's layout, and the keys dropped on the way."""
    if net.adapters[i].name != "swin":
        return sub, []
    # Original Swin and timm 0.6 put patch merging at the end of a stage and keep the mask and
    # index buffers; timm's own filter converts that layout (and is a no-op on timm 1.0 keys).
    from timm.models.swin_transformer import checkpoint_filter_fn

    dropped = sorted(k for k in sub if "relative_position_index" in k or "attn_mask" in k)
    return checkpoint_filter_fn(sub, net.anchors[i]), dropped


def _layer_offsets(net: SNNet) -> dict[tuple[int, int], int]:
    """(pair, stage) -> index of that pair's first layer in that stage."""
    out: dict[tuple[int, int], int] = {}
    for s in net.stitches:
        if not s.is_anchor:
            key = (s.pair, s.stage)
            out[key] = min(out.get(key, s.layer), s.layer)
    return out


def _stitch_key(net: SNNet, family: str, key: str) -> str:
    """Our state-dict key for a reference stitching-layer key."""
    if family == "deit":
        m = re.fullmatch(r"stitch_layers\.(\d+)\.(\d+)\.(transform\.\w+)", key)
        if m is None:
            raise ReferenceFormatError(f"unexpected DeiT stitching key {key!r}")
        return key
    m = re.fullmatch(r"stitch_layers\.(\d+)\.(\d+)\.(\d+)\.(transform\.\w+)", key)
    if m is None:
        raise ReferenceFormatError(
            f"unexpected {family} stitching key {key!r}; expected stitch_layers.STAGE.PAIR.LAYER.*"
        )
    slot, pair, layer, rest = int(m[1]), int(m[2]), int(m[3]), m[4]
    stages = sorted({s.stage for s in net.stitches if not s.is_anchor})
    offsets = _layer_offsets(net)
    if slot >= len(stages) or (pair, stages[slot]) not in offsets:
        raise ReferenceFormatError(
            f"{key!r} names stage slot {slot}, pair {pair}; this family cuts in stages {stages} "
            f"with {len(net.stitch_layers)} pair(s)"
        )
    return f"stitch_layers.{pair}.{offsets[(pair, stages[slot])] + layer}.{rest}"


def convert_reference(
    state: dict[str, torch.Tensor],
    family: str,
    *,
    anchors: list[str] | None = None,
    overrides: dict[str, Any] | list[dict[str, Any]] | None = None,
    input_size: list[int] | None = None,
    trusted_pickle: bool = False,
) -> tuple[SNNet, ImportReport]:
    """Build our SN-Net holding the tensors of a reference release state dict.

    Args:
        state: The file's tensors (see ``read_state_dict``).
        family: ``"deit"``, ``"swin"`` or ``"resnet"``.
        anchors: timm names (default: the release's anchors for ``family``).
        overrides: ``timm.create_model`` overrides (one dict or one per anchor); for
            architectures smaller than the release's, e.g. in tests.
        input_size: (C, H, W) for ResNet-only nets (default: timm's 3x224x224).
        trusted_pickle: Recorded in the report.

    Raises:
        ReferenceFormatError: a tensor has no place in the net, a place gets no tensor, or the
            shapes differ; the message names the keys.
    """
    names = anchors or reference_anchors(family, state)
    per_anchor = _per_anchor_overrides(overrides, len(names))
    config = SNNetConfig(
        [AnchorSpec(n, o) for n, o in zip(names, per_anchor, strict=True)],
        SpaceConfig(stitched_final_norm=family != "deit", unpaired_layers="reference"),
        tuple(input_size) if input_size else None,
    )
    net = snnet_from_config(config)

    ours: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    subs: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"anchors\.(\d+)\.(.+)", key)
        if m and int(m[1]) < len(names):
            subs.setdefault(int(m[1]), {})[m[2]] = value
        elif key.startswith("stitch_layers."):
            ours[_stitch_key(net, family, key)] = value
        else:
            raise ReferenceFormatError(
                f"unexpected key {key!r}: a {family} release with {len(names)} anchors has only "
                "anchors.{i}.* and stitch_layers.* keys"
            )
    for i, sub in sorted(subs.items()):
        converted, dropped = _anchor_state(net, i, sub)
        ours.update({f"anchors.{i}.{k}": v for k, v in converted.items()})
        skipped += [f"anchors.{i}.{k}" for k in dropped]

    expected = net.state_dict()
    missing = sorted(set(expected) - set(ours))
    unexpected = sorted(set(ours) - set(expected))
    if missing or unexpected:
        raise ReferenceFormatError(
            f"the file does not fit {family} anchors {names}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in ours.items():
        if v.shape != expected[k].shape:
            raise ReferenceFormatError(
                f"{k}: the file has shape {list(v.shape)}, the net needs {list(expected[k].shape)}"
            )
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in ours.items()})
    report = ImportReport(family, names, len(ours), skipped, trusted_pickle)
    return net.eval(), report
