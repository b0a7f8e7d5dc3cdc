"""The SN-Net module: timm anchors, stitching layers, and a forward that takes the stitch id."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from .families import FamilyAdapter, adapter_for
from .space import SpaceConfig, Stitch, enumerate_stitches
from .stitching import StitchingLayer, as_rows, least_squares_affine


@dataclass
class AnchorSpec:
    """One anchor: a timm model name and the ``timm.create_model`` overrides it was built with,
    and optionally a display name that says what it is (see ``title``)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    display_name: str | None = None

    @property
    def title(self) -> str:
        """What the anchor is, for people: its display name, else the timm name and the
        overrides that change its architecture (``vit_tiny_patch16_224`` with ``embed_dim=8``
        is not a ViT-Ti)."""
        if self.display_name:
            return self.display_name
        shape = {k: v for k, v in self.overrides.items() if k in ARCHITECTURE_KWARGS}
        if not shape:
            return self.name
        return f"{self.name} with " + ", ".join(f"{k}={v}" for k, v in shape.items())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "overrides": dict(self.overrides)}
        if self.display_name:
            d["display_name"] = self.display_name
        return d


# The timm.create_model keyword arguments that change what an anchor is (named in its title).
ARCHITECTURE_KWARGS = (
    "embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "img_size", "in_chans",
    "num_classes", "embed_dims", "depths", "layers", "window_size",
)  # fmt: skip


@dataclass
class SNNetConfig:
    """Everything needed to rebuild an SN-Net's architecture; stored in every checkpoint."""

    anchors: list[AnchorSpec]
    space: SpaceConfig = field(default_factory=SpaceConfig)
    # (C, H, W) for families that take any size (ResNet); None: the anchors' own size, or
    # timm's default input size when no anchor fixes one.
    input_size: tuple[int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"anchors": [a.to_dict() for a in self.anchors], "space": asdict(self.space)}
        if self.input_size is not None:
            d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SNNetConfig:
        _check_keys(d, {"anchors", "space", "input_size"}, "SN-Net config")
        anchors = []
        for a in d["anchors"]:
            _check_keys(a, {"name", "overrides", "display_name"}, "anchor")
            overrides = dict(a.get("overrides") or {})
            # A checkpoint's architecture must not make timm load other files or fetch weights.
            loading = sorted(set(overrides) & LOADING_KWARGS)
            if loading:
                raise ValueError(
                    f"anchor {a['name']!r} overrides {loading}, which load weights; not allowed in a config"
                )
            title = a.get("display_name")
            if title is not None and not isinstance(title, str):
                raise ValueError(
                    f"anchor {a['name']!r}: display_name must be a string, got {title!r}"
                )
            anchors.append(AnchorSpec(a["name"], overrides, title or None))
        space = d.get("space") or {}
        _check_keys(space, set(SpaceConfig.__dataclass_fields__), "space config")
        size = d.get("input_size")
        return cls(anchors, SpaceConfig(**space), _input_size(size) if size else None)


def _input_size(size: Sequence[int]) -> tuple[int, int, int]:
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"input_size must be 3 positive ints (C, H, W), got {list(size)}")
    return (size[0], size[1], size[2])


LOADING_KWARGS = {
    "pretrained",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
    "checkpoint_path",
    "cache_dir",
}


def _check_keys(d: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(allowed)}")


class SNNet(nn.Module):
    """A Stitchable Neural Network over a family of timm anchors.

    ``net(x, stitch_id)`` runs one stitch. The route is decided by the argument alone, never by
    module state, so one instance can serve different stitches from several threads at once.
    The forward of an anchor's own id is that timm model's own ``forward``.

    Args:
        anchors: timm models of one family, small to large.
        config: The config the anchors were built from (written into checkpoints).
    """

    def __init__(self, anchors: Sequence[nn.Module], config: SNNetConfig) -> None:
        super().__init__()
        if len(anchors) < 2:
            raise ValueError(f"an SN-Net needs at least 2 anchors, got {len(anchors)}")
        if len(anchors) != len(config.anchors):
            raise ValueError(f"{len(anchors)} anchor modules but {len(config.anchors)} in config")
        self.config = config
        self.anchors = nn.ModuleList(anchors)
        self.adapters: list[FamilyAdapter] = [adapter_for(m) for m in anchors]
        # One family, or a mix joined through feature maps of equal grids (ResNet -> Swin).
        self.family = "+".join(dict.fromkeys(ad.name for ad in self.adapters))
        classes = {getattr(m, "num_classes", None) for m in anchors}
        if len(classes) != 1:
            raise ValueError(f"anchors disagree on num_classes: {[m.num_classes for m in anchors]}")
        self.num_classes = int(anchors[0].num_classes)
        self.input_size: tuple[int, int, int] = self._resolve_input_size(anchors, config)

        names = [a.name for a in config.anchors]
        stages = [ad.stages(m) for ad, m in zip(self.adapters, anchors, strict=True)]
        pairs = list(zip(self.adapters[:-1], self.adapters[1:], strict=True))
        cut_stages = [sorted(set(fa.stitch_stages) & set(ba.stitch_stages)) for fa, ba in pairs]
        for (a, b), shared in zip(itertools.pairwise(names), cut_stages, strict=True):
            if not shared:  # (DeiT and ResNet: an SN-Net of two separate models, no stitch)
                raise ValueError(
                    f"{a} and {b} share no stage where one could be cut and joined to the other: "
                    f"anchors of one family (DeiT, Swin, ResNet, ...) or a pair the model library "
                    f"lists as mixed (ResNet to Swin)"
                )
        self.stitches, layers_per_pair = enumerate_stitches(
            names,
            stages,
            config.space,
            cut_stages=cut_stages,
            overlap=[fa.overlapping_cuts and ba.overlapping_cuts for fa, ba in pairs],
        )

        # One width pair per layer; every stitch sharing a layer must agree on it.
        widths: dict[tuple[int, int], tuple[int, int]] = {}
        for s in self.stitches:
            if s.is_anchor:
                continue
            a, b = s.anchors
            j, k = s.cut
            grids = (self._grid(a, j), self._grid(b, k - 1))
            if grids[0] != grids[1]:
                raise ValueError(
                    f"stitch {s.id} ({s.description}): the front's features have layout "
                    f"{grids[0]} but the back expects {grids[1]}; stitched anchors need the same "
                    "patch grid (and the same class/register tokens) at every cut"
                )
            w = (self._width(a, j), self._width(b, k - 1))
            if widths.setdefault((s.pair, s.layer), w) != w:
                raise ValueError(f"stitch {s.id} ({s.description}) disagrees on widths {w}")
        self.stitch_layers = nn.ModuleList(
            nn.ModuleList(
                StitchingLayer(
                    *widths[(p, i)],
                    layout=self.adapters[p].layout,
                    out_layout=self.adapters[p + 1].layout,
                )
                for i in range(n)
            )
            for p, n in enumerate(layers_per_pair)
        )

    def _resolve_input_size(
        self, anchors: Sequence[nn.Module], config: SNNetConfig
    ) -> tuple[int, int, int]:
        sizes = [ad.input_size(m) for ad, m in zip(self.adapters, anchors, strict=True)]
        fixed = sorted({s for s in sizes if s is not None})
        if len(fixed) > 1:
            raise ValueError(f"anchors disagree on input size (C, H, W): {sizes}")
        if config.input_size is not None:
            if fixed and tuple(config.input_size) != fixed[0]:
                built = [a.name for a, size in zip(config.anchors, sizes, strict=True) if size]
                raise ValueError(
                    f"config input_size {list(config.input_size)} differs from the anchors' "
                    f"{list(fixed[0])}; leave it unset or give the anchors' size. "
                    f"{', '.join(built)} {'is' if len(built) == 1 else 'are'} built for one "
                    f"size: give {'its' if len(built) == 1 else 'each'} own in --overrides "
                    f'(a list, one object per anchor), e.g. {{"img_size": '
                    f"{config.input_size[1]}}} (Swin also wants a window_size that divides its "
                    f"stages' grids)"
                )
            return tuple(config.input_size)
        if fixed:
            return fixed[0]
        # Fully convolutional anchors only: timm's default size, channels as built.
        default = timm.data.resolve_model_data_config(anchors[0])["input_size"]
        return (_in_channels(anchors[0]), int(default[1]), int(default[2]))

    def _grid(self, anchor: int, after_unit: int) -> tuple:
        ad, m = self.adapters[anchor], self.anchors[anchor]
        return ad.feature_grid(m, after_unit, self.input_size)

    def _width(self, anchor: int, after_unit: int) -> int:
        return self.adapters[anchor].feature_width(self.anchors[anchor], after_unit)

    @property
    def anchor_names(self) -> list[str]:
        return [a.name for a in self.config.anchors]

    def stitch(self, stitch_id: int) -> Stitch:
        """The stitch with this id, or a ValueError naming the valid range."""
        try:
            i = operator.index(stitch_id)
        except TypeError:
            raise TypeError(f"stitch_id must be an int, got {type(stitch_id).__name__}") from None
        if not 0 <= i < len(self.stitches):
            raise ValueError(
                f"unknown stitch id {stitch_id}; valid ids are 0..{len(self.stitches) - 1}"
            )
        return self.stitches[i]

    def forward(self, x: torch.Tensor, stitch_id: int) -> torch.Tensor:
        s = self.stitch(stitch_id)
        if s.is_anchor:
            return self.anchors[s.anchors[0]](x)
        a, b = s.anchors
        j, k = s.cut
        front, back = self.anchors[a], self.anchors[b]
        h = self.adapters[a].stem(front, x)
        for unit in self.adapters[a].units(front)[: j + 1]:
            h = unit(h)
        h = self.stitch_layers[s.pair][s.layer](h)
        for unit in self.adapters[b].units(back)[k:]:
            h = unit(h)
        return self.adapters[b].head(back, h, final_norm=self.config.space.stitched_final_norm)

    @torch.no_grad()
    def unit_features(self, anchor: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of anchor ``anchor`` at every cut: ``[stem, unit 0, unit 1, ...]`` outputs."""
        m, ad = self.anchors[anchor], self.adapters[anchor]
        h = ad.stem(m, x)
        out = [h]
        for unit in ad.units(m):
            h = unit(h)
            out.append(h)
        return out

    @torch.no_grad()
    def init_stitching_layers(self, images: torch.Tensor) -> None:
        """Least-squares initialisation of every stitching layer from a batch of real images.

        For stitch ``(j, k)`` the layer maps the front anchor's output of unit ``j`` to the back
        anchor's input of unit ``k``; a layer shared by several stitches gets the mean of their
        solutions. Runs in eval mode (the module's mode is restored afterwards).
        """
        was_training = self.training
        self.eval()
        try:
            feats = [self.unit_features(i, images) for i in range(len(self.anchors))]
            solutions: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for s in self.stitches:
                if s.is_anchor:
                    continue
                a, b = s.anchors
                j, k = s.cut
                layout = self.adapters[a].layout
                x = as_rows(feats[a][j + 1].float(), layout)
                y = as_rows(feats[b][k].float(), self.adapters[b].layout)
                solutions.setdefault((s.pair, s.layer), []).append(least_squares_affine(x, y))
            for (p, i), sols in solutions.items():
                w = torch.stack([w for w, _ in sols]).mean(0)
                bias = torch.stack([b for _, b in sols]).mean(0)
                self.stitch_layers[p][i].set_affine(w, bias)
        finally:
            self.train(was_training)

    def data_config(self) -> dict[str, Any]:
        """Preprocessing for this net: timm's data config of the first anchor, with the input
        size the anchors were actually built for and mean/std fitted to its channel count."""
        cfg = dict(timm.data.resolve_model_data_config(self.anchors[0]))
        c = self.input_size[0]
        for key in ("mean", "std"):
            v = tuple(float(x) for x in cfg[key])
            if len(v) != c:
                v = (sum(v) / len(v),) * c
            cfg[key] = list(v)
        cfg["input_size"] = list(self.input_size)
        return cfg

    def extra_repr(self) -> str:
        return f"family={self.family}, anchors={self.anchor_names}, stitches={len(self.stitches)}"


def _in_channels(model: nn.Module) -> int:
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return int(first.in_channels)


def _per_anchor_overrides(
    overrides: dict[str, Any] | Sequence[dict[str, Any] | None] | None, n: int
) -> list[dict[str, Any]]:
    if overrides is None:
        return [{} for _ in range(n)]
    if isinstance(overrides, dict):
        return [dict(overrides) for _ in range(n)]
    overrides = list(overrides)
    if len(overrides) != n:
        raise ValueError(
            f"got {len(overrides)} override dicts for {n} anchors; give one per anchor"
        )
    return [dict(o or {}) for o in overrides]


def build_snnet(
    anchors: str | Sequence[str],
    pretrained: bool = False,
    *,
    overrides: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None,
    window: int = 2,
    stride: int = 1,
    input_size: Sequence[int] | None = None,
) -> SNNet:
    """Build an SN-Net from timm model names, small to large.

    Args:
        anchors: timm names, as a list or a comma-separated string, e.g.
            ``"deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"``.
        pretrained: Load timm's pretrained weights (needs access to the model hub).
        overrides: ``timm.create_model`` keyword overrides: one dict for all anchors, or a list
            with one dict (or None) per anchor, e.g. ``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ``in_chans``.
        window: Sliding-window size of paired stitching, in blocks.
        stride: Sliding-window stride.
        input_size: (C, H, W) for anchors that take any size (ResNet); default: the anchors'
            size, else timm's default.
    """
    names = [n.strip() for n in anchors.split(",")] if isinstance(anchors, str) else list(anchors)
    names = [n for n in names if n]
    per_anchor = _per_anchor_overrides(overrides, len(names))
    if input_size is not None and int(list(input_size)[0]) != 3:
        # --input-size 1,28,28 built anchors for 3 channels (timm's default), which then failed
        # on the first image: the channels are the anchors' in_chans unless given there
        per_anchor = [{"in_chans": int(list(input_size)[0]), **o} for o in per_anchor]
    config = SNNetConfig(
        [AnchorSpec(n, o) for n, o in zip(names, per_anchor, strict=True)],
        SpaceConfig(window=window, stride=stride),
        _input_size(list(input_size)) if input_size is not None else None,
    )
    _check_order(config, per_anchor_overrides=isinstance(overrides, Sequence))
    return snnet_from_config(config, pretrained=pretrained)


def _check_order(config: SNNetConfig, per_anchor_overrides: bool) -> None:
    """Stitches join a front part of an anchor to the back part of the next: small to large, as
    the paper stitches (the other way round built 71 stitches without a word, DeiT-B first).
    Checked on parameter-less copies (the meta device), before any weights are built or
    downloaded. A mix of families goes in the order its adapters join (ResNet to Swin),
    whatever the sizes; what does not build here is left to ``snnet_from_config`` to say."""
    try:
        with torch.device("meta"):
            models = [timm.create_model(a.name, **a.overrides) for a in config.anchors]
        if len({adapter_for(m).name for m in models}) > 1:
            return
    except Exception:  # an unknown model, an override it does not take, another family
        return
    names = [a.name for a in config.anchors]
    sizes = [sum(p.numel() for p in m.parameters()) for m in models]
    for (a, n), (b, m) in itertools.pairwise(zip(names, sizes, strict=True)):
        if n > m:
            order = ",".join(name for _, name in sorted(zip(sizes, names, strict=True)))
            also = " (and their overrides in the same order)" if per_anchor_overrides else ""
            raise ValueError(
                f"anchors go small to large: {a} ({n:,} parameters) is given before {b} "
                f"({m:,}); give them as {order}{also}"
            )


def snnet_from_config(config: SNNetConfig, pretrained: bool = False) -> SNNet:
    """Build the SN-Net a config describes (weights random unless ``pretrained``)."""
    models = []
    for spec in config.anchors:
        try:
            models.append(timm.create_model(spec.name, pretrained=pretrained, **spec.overrides))
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"unknown timm model {spec.name!r}: {e}") from None
            raise
        except TypeError as e:  # an override the model does not take: {"bogus": 1}
            raise ValueError(
                f"timm's {spec.name} does not take the overrides {spec.overrides} ({e})"
            ) from None
    return SNNet(models, config)
