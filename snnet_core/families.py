"""Family adapters: how to cut a timm model of one architecture into stem, units and head.

An SN-Net route runs the front anchor's stem and first units, a stitching layer, then the back
anchor's remaining units and head. A family adapter is the only place that knows which timm
attributes make up those three parts; everything else (the stitch space, least-squares init,
cost counting, checkpoints) works on the adapter's view. Adding a family (Swin, ResNet) means
adding one adapter class here and registering it, not touching the core.

Invariant every adapter keeps: ``head(m, fold(units(m), stem(m, x)))`` computes what ``m(x)``
computes, op for op, in eval mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn


class FamilyAdapter(ABC):
    """View of one timm architecture as ``stem -> units[0..n) -> head``.

    Attributes:
        name: Family name written into checkpoints (``"vit"``).
        layout: Layout of the features between units: ``"tokens"`` for (B, N, C) token
            sequences, ``"nchw"`` for (B, C, H, W) feature maps. Decides the stitching layer.
    """

    name: str = ""
    layout: str = "tokens"

    @staticmethod
    @abstractmethod
    def matches(model: nn.Module) -> bool:
        """Whether this adapter understands ``model``."""

    @abstractmethod
    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input images to the features the first unit takes."""

    @abstractmethod
    def units(self, model: nn.Module) -> Sequence[nn.Module]:
        """The cuttable units in order; a stitch cuts between two of them."""

    @abstractmethod
    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Last unit's features to logits."""

    @abstractmethod
    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose parameters belong to the head (everything not in units or head is stem)."""

    @abstractmethod
    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        """Channels of the features after unit ``after_unit`` (-1: after the stem)."""

    def feature_layout(self, model: nn.Module) -> tuple:
        """What must match between two anchors for a stitching layer to join them, besides
        channels (e.g. token count and prefix tokens); compared across anchors at build time."""
        return ()

    @abstractmethod
    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """(channels, height, width) the model was built for (timm's data config may not know
        about ``create_model`` overrides such as ``img_size``)."""


class ViTFamily(FamilyAdapter):
    """timm ``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT-III, ...).

    Units are the transformer blocks; the stem is patch embedding, prefix tokens, position
    embedding and pre-norm; the head is the final norm followed by timm's ``forward_head``.
    Mirrors ``VisionTransformer.forward_features``/``forward_head`` in timm 1.0.
    """

    name = "vit"
    layout = "tokens"

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

    def head(self, model: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(h))

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [model.norm, model.fc_norm, model.head_drop, model.head]
        for extra in ("attn_pool", "head_dist"):  # attention pooling; DeiT-distilled second head
            if getattr(model, extra, None) is not None:
                mods.append(getattr(model, extra))
        return mods

    def feature_width(self, model: nn.Module, after_unit: int) -> int:
        return int(model.embed_dim)

    def feature_layout(self, model: nn.Module) -> tuple:
        grid = tuple(int(g) for g in model.patch_embed.grid_size)
        return ("tokens", grid, int(model.num_prefix_tokens))

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        pe = model.patch_embed
        return (int(pe.proj.in_channels), *(int(v) for v in pe.img_size))


FAMILIES: dict[str, type[FamilyAdapter]] = {"vit": ViTFamily}


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for a timm model, or a ValueError naming the supported families."""
    for cls in FAMILIES.values():
        if cls.matches(model):
            return cls()
    raise ValueError(
        f"no SN-Net family adapter for {type(model).__name__}; supported: "
        f"{', '.join(sorted(FAMILIES))} (timm VisionTransformer and subclasses)"
    )
