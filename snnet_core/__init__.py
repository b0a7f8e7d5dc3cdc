"""snnet_core: Stitchable Neural Networks built from timm anchor families.

Public API: build an SN-Net (``build_snnet``; ViT/DeiT, Swin and ResNet anchors), run any stitch
(``net(x, stitch_id)``), count and measure its cost (``stitch_costs``, ``measure_latency``),
save/load self-describing checkpoints (``save``, ``load``), rank their stitches
(``StitchMenu``), resolve where they run (``resolve_device``, ``resolve_dtype``), and import the reference release
files (``read_state_dict``, ``convert_reference``).
"""

from .checkpoint import (
    CheckpointError,
    Manifest,
    load,
    new_manifest,
    read_manifest,
    save,
    stitch_table,
    verify,
    write_manifest,
)
from .data import ImageTransform, image_transform
from .device import DTYPES, resolve_device, resolve_dtype
from .families import FAMILIES, FamilyAdapter, ResNetFamily, SwinFamily, ViTFamily, adapter_for
from .menu import StitchMenu, StitchRow, UnknownStitch
from .profile import (
    DeviceFingerprint,
    LatencyProfile,
    StitchCost,
    measure_latency,
    pareto_front,
    stitch_costs,
)
from .reference import ReferenceFormatError, convert_reference, read_state_dict
from .snnet import AnchorSpec, SNNet, SNNetConfig, build_snnet, snnet_from_config
from .space import SpaceConfig, Stitch, enumerate_stitches, paired_stitching
from .stitching import StitchingLayer, least_squares_affine

__all__ = [
    "CheckpointError",
    "Manifest",
    "load",
    "new_manifest",
    "read_manifest",
    "save",
    "stitch_table",
    "verify",
    "write_manifest",
    "DTYPES",
    "FAMILIES",
    "AnchorSpec",
    "DeviceFingerprint",
    "FamilyAdapter",
    "LatencyProfile",
    "ReferenceFormatError",
    "ResNetFamily",
    "SNNet",
    "SNNetConfig",
    "SpaceConfig",
    "Stitch",
    "StitchCost",
    "StitchMenu",
    "StitchRow",
    "StitchingLayer",
    "SwinFamily",
    "UnknownStitch",
    "ViTFamily",
    "adapter_for",
    "build_snnet",
    "convert_reference",
    "enumerate_stitches",
    "ImageTransform",
    "image_transform",
    "least_squares_affine",
    "measure_latency",
    "paired_stitching",
    "pareto_front",
    "read_state_dict",
    "resolve_device",
    "resolve_dtype",
    "snnet_from_config",
    "stitch_costs",
]
