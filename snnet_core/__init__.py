"""snnet_core: Stitchable Neural Networks built from timm anchor families.

Public API: build an SN-Net (``build_snnet``), run any stitch (``net(x, stitch_id)``), count and
measure its cost (``stitch_costs``, ``measure_latency``), and save/load self-describing
checkpoints (``save``, ``load``).
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
from .data import image_transform
from .families import FAMILIES, FamilyAdapter, ViTFamily, adapter_for
from .profile import (
    DeviceFingerprint,
    LatencyProfile,
    StitchCost,
    measure_latency,
    pareto_front,
    stitch_costs,
)
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
    "FAMILIES",
    "AnchorSpec",
    "DeviceFingerprint",
    "FamilyAdapter",
    "LatencyProfile",
    "SNNet",
    "SNNetConfig",
    "SpaceConfig",
    "Stitch",
    "StitchCost",
    "StitchingLayer",
    "ViTFamily",
    "adapter_for",
    "build_snnet",
    "enumerate_stitches",
    "image_transform",
    "least_squares_affine",
    "measure_latency",
    "paired_stitching",
    "pareto_front",
    "snnet_from_config",
    "stitch_costs",
]
