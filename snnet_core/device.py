"""Where a net runs and in what precision: the one resolver the CLI and the server share."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else cpu; ``cpu``, ``cuda`` or ``cuda:N`` as named.

    Raises:
        ValueError: CUDA is asked for but not available, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but CUDA is not available here; use cpu or auto"
        )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype called ``name``, checked against ``device``.

    Raises:
        ValueError: an unknown name, or float16 off CUDA (CPU kernels for it are slow or missing).
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    if name == "float16" and device.type != "cuda":
        raise ValueError(
            f"dtype float16 needs CUDA but the device is {device}; use float32 or bfloat16"
        )
    return DTYPES[name]
