"""Shared fixtures: a tiny real timm ViT family on real MNIST digits (no network).

`make test` runs the suite in two passes: every test not marked `timing` in parallel (pytest-xdist,
a file to each worker), then the `timing` tests alone. Mark a test or module `timing` when what it
asserts depends on the server's own timings (the stitch under a budget, a 503 or not, a load level,
a time bound): beside another worker's load it would flake. Every other test must pass whatever ran
before it in its process (no reliance on another test's side effects, such as a module's net left
in eval mode).
"""

from __future__ import annotations

import os

import pytest
import torch

import snnet_core
from snnet_core.data import mnist_subset

# Servers and apps the tests start have no gRPC endpoint unless a test asks for one (with a free
# port): the default port would be taken by the first of them.
os.environ.setdefault("SNNET_GRPC_PORT", "0")

# Three timm VisionTransformers for 28x28 grey digits, patch 7 (16 tokens + class token), depth 4,
# increasing width: 23 stitches (3 anchors + 2 pairs x 10).
TINY_ANCHORS = "vit_tiny_patch16_224,vit_small_patch16_224,vit_base_patch16_224"
TINY_COMMON = {"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "depth": 4}
TINY_OVERRIDES = [
    {**TINY_COMMON, "embed_dim": 16, "num_heads": 2},
    {**TINY_COMMON, "embed_dim": 24, "num_heads": 2},
    {**TINY_COMMON, "embed_dim": 32, "num_heads": 2},
]
TINY_NUM_STITCHES = 23


@pytest.fixture(scope="session", autouse=True)
def _own_cache_directory(tmp_path_factory):
    """The servers and runners of the suite remember thread counts in XDG_CACHE_HOME
    (``server.early``): in a directory of this run, not the user's cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def build_tiny(seed: int = 0) -> snnet_core.SNNet:
    torch.manual_seed(seed)
    return snnet_core.build_snnet(TINY_ANCHORS, overrides=TINY_OVERRIDES)


@pytest.fixture
def tiny_net() -> snnet_core.SNNet:
    return build_tiny().eval()


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 real held-out MNIST digits (N, 1, 28, 28) in [0, 1] and their labels."""
    x, y = mnist_subset("held_out")
    return x[::16][:64].contiguous(), y[::16][:64].contiguous()


@pytest.fixture(scope="session")
def train_digits() -> torch.Tensor:
    x, _ = mnist_subset("train")
    return x[::40][:100].contiguous()
