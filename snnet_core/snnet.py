"""The SN-Net module: timm anchors, stitching layers, and a forward that takes the stitch id."""

from __future__ import annotations

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
    """One anchor: a timm model name and the ``timm.create_model`` overrides it was built with."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SNNetConfig:
    """Everything needed to rebuild an SN-Net's architecture; stored in every checkpoint."""

    anchors: list[AnchorSpec]
    space: SpaceConfig = field(default_factory=SpaceConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"anchors": [asdict(a) for a in self.anchors], "space": asdict(self.space)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SNNetConfig:
        _check_keys(d, {"anchors", "space"}, "SN-Net config")
        anchors = []
        for a in d["anchors"]:
            _check_keys(a, {"name", "overrides"}, "anchor")
            overrides = dict(a.get("overrides") or {})
            # A checkpoint's architecture must not make timm load other files or fetch weights.
            loading = sorted(set(overrides) & LOADING_KWARGS)
            if loading:
                raise ValueError(
                    f"anchor {a['name']!r} overrides {loading}, which load weights; not allowed in a config"
                )
            anchors.append(AnchorSpec(a["name"], overrides))
        space = d.get("space") or {}
        _check_keys(space, {"window", "stride"}, "space config")
        return cls(anchors, SpaceConfig(**space))


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
        families = {a.name for a in self.adapters}
        if len(families) != 1:
            raise ValueError(f"anchors mix families {sorted(families)}; use anchors of one family")
        self.family = self.adapters[0].name
        classes = {getattr(m, "num_classes", None) for m in anchors}
        if len(classes) != 1:
            raise ValueError(f"anchors disagree on num_classes: {[m.num_classes for m in anchors]}")
        self.num_classes = int(anchors[0].num_classes)
        sizes = [ad.input_size(m) for ad, m in zip(self.adapters, anchors, strict=True)]
        if len(set(sizes)) != 1:
            raise ValueError(f"anchors disagree on input size (C, H, W): {sizes}")
        self.input_size: tuple[int, int, int] = sizes[0]
        layouts = [ad.feature_layout(m) for ad, m in zip(self.adapters, anchors, strict=True)]
        if len(set(layouts)) != 1:
            raise ValueError(
                f"anchors disagree on their feature layout (kind, patch grid, prefix tokens): {layouts}; "
                "stitched anchors need the same patch size and the same class/register tokens"
            )

        names = [a.name for a in config.anchors]
        depths = [len(ad.units(m)) for ad, m in zip(self.adapters, anchors, strict=True)]
        self.stitches, layers_per_pair = enumerate_stitches(names, depths, config.space)

        # One width pair per layer; every stitch sharing a layer must agree on it.
        widths: dict[tuple[int, int], tuple[int, int]] = {}
        for s in self.stitches:
            if s.is_anchor:
                continue
            a, b = s.anchors
            j, k = s.cut
            w = (self._width(a, j), self._width(b, k - 1))
            if widths.setdefault((s.pair, s.layer), w) != w:
                raise ValueError(f"stitch {s.id} ({s.description}) disagrees on widths {w}")
        self.stitch_layers = nn.ModuleList(
            nn.ModuleList(
                StitchingLayer(*widths[(p, i)], layout=self.adapters[p].layout) for i in range(n)
            )
            for p, n in enumerate(layers_per_pair)
        )

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
        return self.adapters[b].head(back, h)

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
) -> SNNet:
    """Build an SN-Net from timm model names, small to large.

    Args:
        anchors: timm names, as a list or a comma-separated string, e.g.
            ``"deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224"``.
        pretrained: Load timm's pretrained weights (needs access to the model hub).
        overrides: ``timm.create_model`` keyword overrides: one dict for all anchors, or a list
            with one dict (or None) per anchor, e.g. ``img_size``, ``patch_size``,
            ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ``in_chans``.
        window: Sliding-window size of paired stitching, in units.
        stride: Sliding-window stride.
    """
    names = [n.strip() for n in anchors.split(",")] if isinstance(anchors, str) else list(anchors)
    names = [n for n in names if n]
    per_anchor = _per_anchor_overrides(overrides, len(names))
    config = SNNetConfig(
        [AnchorSpec(n, o) for n, o in zip(names, per_anchor, strict=True)],
        SpaceConfig(window=window, stride=stride),
    )
    return snnet_from_config(config, pretrained=pretrained)


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
    return SNNet(models, config)
