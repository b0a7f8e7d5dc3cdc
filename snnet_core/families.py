"""Family adapters: how to cut a timm model of one architecture into stem, units and head.

An SN-Net route runs the front anchor's stem and first units, a stitching layer, then the back
anchor's remaining units and head. A family adapter is the only place that knows which timm
attributes make up those three parts, how the units group into stages, in which stages a cut is
allowed, and what layout the features have; everything else (the stitch space, least-squares
init, cost counting, checkpoints) works on the adapter's view. Adding a family means adding one
adapter class here and registering it, not touching the core.

Units are flat: every module between stem and head, in forward order. For hierarchical models a
stage's downsampling layer is a unit of its own (Swin's patch merging) or part of its first block
(ResNet); cuts only fall between two blocks of one stage, so such units are never cut around.

Invariant every adapter keeps: ``head(m, fold(units(m), stem(m, x)))`` computes what ``m(x)``
computes, op for op, in eval mode.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn


class FamilyAdapter(ABC):
    """View of one timm architecture as ``stem -> units[0..n) -> head``.

    Attributes:
        name: Family name written into checkpoints (``"vit"``).
        layout: Layout of the features between units: ``"tokens"`` for channels-last features
            ((B, N, C) token sequences or Swin's (B, H, W, C) maps), ``"nchw"`` for (B, C, H, W)
            feature maps. Decides the stitching layer.
        stitch_stages: Stages inside which stitches may cut (the reference's choice per family).
        overlapping_cuts: Whether paired stitching also gives cuts ``(j, k)`` with ``k <= j``
            (a back part that repeats depth). The reference does so for DeiT only.
    """

    name: str = ""
    layout: str = "tokens"
    stitch_stages: tuple[int, ...] = (0,)
    overlapping_cuts: bool = False

    @staticmethod
    @abstractmethod
    def matches(model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""

    @abstractmethod
    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input images to the features the first unit takes."""

    @abstractmethod
    def units(self, model: nn.Module) -> Sequence[nn.Module]:
        """Every module between stem and head, in order; stitches cut between two of them."""

    def stages(self, model: nn.Module) -> list[range]:
        """Indices into ``units`` of each stage's blocks (the places a cut may fall)."""
        return [range(len(self.units(model)))]

    @abstractmethod
    def head(self, model: nn.Module, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        """Last unit's features to logits; ``final_norm=False`` skips the final norm (used only
        to reproduce the reference DeiT release, see ``SpaceConfig.stitched_final_norm``)."""

    @abstractmethod
    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose parameters belong to the head (everything not in units or head is stem)."""

    @abstractmethod
    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        """Channels of the features after unit ``after_unit`` (-1: after the stem)."""

    @abstractmethod
    def feature_grid(
        self, model: nn.Module, after_unit: int, input_size: tuple[int, int, int]
    ) -> tuple:
        """What must match, besides channels, between the features a stitching layer takes and
        the features the back anchor expects at ``input_size`` (spatial grid; prefix tokens for
        ViTs)."""

    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        """(channels, height, width) the model was built for, or None for a fully convolutional
        model that takes any size (timm's data config may not know about ``create_model``
        overrides such as ``img_size``)."""


class ViTFamily(FamilyAdapter):
    """timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT-III, ...).

    Units are the transformer blocks, all in one stage; the stem is patch embedding, prefix
    tokens, position embedding and pre-norm; the head is the final norm followed by timm's
    ``forward_head``. Mirrors ``VisionTransformer.forward_features``/``forward_head`` in timm 1.0.
    """

    name = "vit"
    layout = "tokens"
    stitch_stages = (0,)
    overlapping_cuts = True

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)  # (B, N, C)

    def units(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.blocks

    def head(self, model: nn.Module, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return model.forward_head(model.norm(h) if final_norm else h)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [model.norm, model.fc_norm, model.head_drop, model.head]
        for extra in ("attn_pool", "head_dist"):  # attention pooling; DeiT-distilled second head
            if getattr(model, extra, None) is not None:
                mods.append(getattr(model, extra))
        return mods

    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        return int(model.embed_dim)

    def feature_grid(
        self, model: nn.Module, after_unit: int, input_size: tuple[int, int, int]
    ) -> tuple:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        return ("tokens", grid, int(model.num_prefix_tokens))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        pe = model.patch_embed
        return (int(pe.proj.in_channels), *(int(v) for v in pe.img_size))


class SwinFamily(FamilyAdapter):
    """timm ``SwinTransformer`` (v1): Swin-T/S/B.

    timm 1.0 keeps features channels-last, (B, H, W, C), and puts each stage's patch merging at
    the *start* of stages 1-3 (the original code put it at the end of stages 0-2). Units are, per
    stage, its patch merging (stages 1-3) followed by its blocks; cuts fall between blocks of
    stages 0-2 only, as in the reference, so a stitch never lands next to a patch merging and the
    two placements give the same routes. The stem is the patch embedding; the head is the final
    norm and timm's classifier head (average pool + fc).
    """

    name = "swin"
    layout = "tokens"
    stitch_stages = (0, 1, 2)
    overlapping_cuts = False

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.swin_transformer import SwinTransformer

        return isinstance(model, SwinTransformer)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.patch_embed(x)  # (B, H, W, C)

    def _layout(self, model: nn.Module) -> tuple[list[nn.Module], list[range], list[int]]:
        units: list[nn.Module] = []
        stages: list[range] = []
        stage_of: list[int] = []  # stage of every unit, for widths and grids
        for s, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                units.append(stage.downsample)
                stage_of.append(s)
            first = len(units)
            units.extend(stage.blocks)
            stage_of.extend([s] * len(stage.blocks))
            stages.append(range(first, len(units)))
        return units, stages, stage_of

    def units(self, model: nn.Module) -> Sequence[nn.Module]:
        return self._layout(model)[0]

    def stages(self, model: nn.Module) -> list[range]:
        return self._layout(model)[1]

    def head(self, model: nn.Module, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return model.forward_head(model.norm(h) if final_norm else h)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.norm, model.head]

    def _stage(self, model: nn.Module, after_unit: int) -> int:
        return 0 if after_unit < 0 else self._layout(model)[2][after_unit]

    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        return int(model.feature_info[self._stage(model, after_unit)]["num_chs"])

    def feature_grid(
        self, model: nn.Module, after_unit: int, input_size: tuple[int, int, int]
    ) -> tuple:
        res = model.layers[self._stage(model, after_unit)].output_resolution
        return ("grid", tuple(int(v) for v in res))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        pe = model.patch_embed
        return (int(pe.proj.in_channels), *(int(v) for v in pe.img_size))


class ResNetFamily(FamilyAdapter):
    """timm ``ResNet`` (ResNet-18/34/50/101..., the classic 4-stage layout).

    Units are the residual blocks of ``layer1..layer4`` (a stage's downsampling lives inside its
    first block); cuts fall between blocks of stages 1-2 (``layer2``, ``layer3``) only, as in the
    reference. Features are (B, C, H, W) maps, so stitching layers are 1x1 convolutions. The stem
    is conv1/bn1/act1/maxpool; the head is timm's ``forward_head`` (global pool + fc). ResNets
    take any input size; the SN-Net's input size comes from a fixed-size anchor or the config.
    """

    name = "resnet"
    layout = "nchw"
    stitch_stages = (1, 2)
    overlapping_cuts = False

    @staticmethod
    def matches(model: nn.Module) -> bool:
        from timm.models.resnet import ResNet

        return isinstance(model, ResNet)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.conv1(x)
        x = model.bn1(x)
        x = model.act1(x)
        return model.maxpool(x)  # (B, C, H, W)

    def _layers(self, model: nn.Module) -> list[nn.Sequential]:
        return [model.layer1, model.layer2, model.layer3, model.layer4]

    def units(self, model: nn.Module) -> Sequence[nn.Module]:
        return [block for layer in self._layers(model) for block in layer]

    def stages(self, model: nn.Module) -> list[range]:
        out, start = [], 0
        for layer in self._layers(model):
            out.append(range(start, start + len(layer)))
            start += len(layer)
        return out

    def head(self, model: nn.Module, h: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        return model.forward_head(h)  # no final norm to skip

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.global_pool, model.fc]

    def _stage(self, model: nn.Module, after_unit: int) -> int:
        if after_unit < 0:
            return -1
        return next(s for s, r in enumerate(self.stages(model)) if after_unit in r)

    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        # feature_info: [stem (act1), layer1, ..., layer4]
        return int(model.feature_info[self._stage(model, after_unit) + 1]["num_chs"])

    def feature_grid(
        self, model: nn.Module, after_unit: int, input_size: tuple[int, int, int]
    ) -> tuple:
        # The stem ends with the max pool, at layer1's stride (layer1 does not downsample).
        stage = max(self._stage(model, after_unit), 0)
        reduction = int(model.feature_info[stage + 1]["reduction"])
        # Every stride-2 layer (3x3 or 7x7, padded) rounds up, so the grid is a repeated ceil.
        grid = []
        for v in input_size[1:]:
            for _ in range(int(math.log2(reduction))):
                v = (v + 1) // 2
            grid.append(v)
        return ("grid", tuple(grid))

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None:
        return None


FAMILIES: dict[str, type[FamilyAdapter]] = {
    "vit": ViTFamily,
    "swin": SwinFamily,
    "resnet": ResNetFamily,
}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a timm model, or a ValueError naming the supported families."""
    for cls in FAMILIES.values():
        if cls.matches(model):
            return cls()
    raise ValueError(
        f"no SN-Net family adapter for {type(model).__name__}; supported: "
        f"{', '.join(sorted(FAMILIES))} (timm VisionTransformer, SwinTransformer, ResNet)"
    )
