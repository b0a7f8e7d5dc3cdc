"""Stitching layers and their least-squares initialisation.

A stitching layer maps the front anchor's features at a cut to the features the back anchor
expects there: a Linear with bias over the channel dimension of every token (class token
included), a 1x1 convolution with bias for feature maps, and for a CNN front with a
channels-last back (ResNet -> Swin) a 1x1 convolution whose output is moved channels-last, which
is the same affine map applied to every pixel. Initialisation solves
``[X, 1] @ [W; b] = Y`` by least squares on real inputs, as the reference does with a
pseudo-inverse, and averages the solutions of the stitches that share one layer.
"""

from __future__ import annotations

import torch
from torch import nn


class StitchingLayer(nn.Module):
    """Channel map between two anchors' features at a cut.

    Args:
        in_dim: Channels of the front anchor's features.
        out_dim: Channels the back anchor expects.
        layout: Layout of the front's features: ``"tokens"`` ((B, N, C) or channels-last) or
            ``"nchw"`` ((B, C, H, W)).
        out_layout: Layout the back anchor expects (default: ``layout``). ``"nchw"`` to
            ``"tokens"`` is supported (channels-last output, (B, H, W, C)); the reverse is not.
    """

    def __init__(
        self, in_dim: int, out_dim: int, layout: str = "tokens", out_layout: str | None = None
    ) -> None:
        super().__init__()
        out_layout = layout if out_layout is None else out_layout
        for name, value in (("layout", layout), ("out_layout", out_layout)):
            if value not in ("tokens", "nchw"):
                raise ValueError(f"{name} must be 'tokens' or 'nchw', got {value!r}")
        if (layout, out_layout) == ("tokens", "nchw"):
            raise ValueError("stitching tokens into a feature-map (nchw) anchor is not supported")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.layout, self.out_layout = layout, out_layout
        # Attribute name `transform` matches the reference release's state-dict keys; a conv
        # for nchw input keeps their weight shape (out, in, 1, 1) for ResNet -> Swin too.
        if layout == "tokens":
            self.transform: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.transform = nn.Conv2d(in_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transform(x)
        if self.layout != self.out_layout:
            x = x.movedim(1, -1)  # (B, C, H, W) -> (B, H, W, C)
        return x

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the map to ``y = x @ weight.T + bias``; ``weight`` is (out_dim, in_dim)."""
        w = self.transform.weight
        self.transform.weight.copy_(weight.reshape(w.shape).to(w))
        self.transform.bias.copy_(bias.to(w))


def as_rows(features: torch.Tensor, layout: str) -> torch.Tensor:
    """Features as a (samples, channels) matrix: one row per token or per pixel."""
    if layout == "nchw":
        features = features.movedim(1, -1)  # (B, H, W, C)
    return features.reshape(-1, features.shape[-1])


def least_squares_affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-norm least-squares solution of ``x @ W.T + b = y``.

    Solved in float64 on the CPU with a column of ones for the bias; the same solution as
    ``pinv([x, 1]) @ y``.

    Args:
        x: (samples, in_dim) inputs.
        y: (samples, out_dim) targets.

    Returns:
        ``(W, b)`` with W of shape (out_dim, in_dim) and b of shape (out_dim,), float32.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    x64 = x.detach().to("cpu", torch.float64)
    a = torch.cat([x64, torch.ones(x64.shape[0], 1, dtype=torch.float64)], dim=1)
    sol = torch.linalg.lstsq(a, y.detach().to("cpu", torch.float64), driver="gelsd").solution
    return sol[:-1].T.float().contiguous(), sol[-1].float().contiguous()
