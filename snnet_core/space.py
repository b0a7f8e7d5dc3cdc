"""The stitch space: which routes exist, how they are numbered, which layer each one uses.

Reference numbering (SN-Net, DeiT): ids ``0..A-1`` are the anchors, small to large; then, for
each nearest-neighbour pair (0->1, 1->2, ...) in order, that pair's stitches in the order the
sliding window discovers them. A stitch ``(j, k)`` runs the front anchor's units ``0..j``, the
stitching layer, then the back anchor's units ``k..end``. Inside a window of size 2 this gives
``k`` in ``{j-1, j, j+1}``, so some stitches are deeper than either anchor.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceConfig:
    """Options of the stitch space; stored in every checkpoint."""

    window: int = 2  # sliding-window size over the units, in units
    stride: int = 1  # step of the sliding window, in units

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


@dataclass(frozen=True)
class Stitch:
    """One network of the SN-Net: an anchor alone, or a front part joined to a back part.

    Attributes:
        id: Stitch id in the reference numbering.
        anchors: ``(i,)`` for anchor ``i`` alone; ``(front, back)`` for a stitched route.
        cut: ``(j, k)`` for a stitched route (front runs units ``0..j``, back runs ``k..``);
            ``None`` for an anchor.
        pair: Index of the anchor pair (``front``), ``None`` for an anchor.
        layer: Index of the stitching layer within its pair, ``None`` for an anchor.
        description: Human-readable route, e.g. ``deit_tiny[0:5] -> deit_small[5:12]``.
    """

    id: int
    anchors: tuple[int, ...]
    cut: tuple[int, int] | None
    pair: int | None
    layer: int | None
    description: str

    @property
    def is_anchor(self) -> bool:
        return self.cut is None


def paired_stitching(
    depth: int, window: int = 2, stride: int = 1
) -> tuple[list[tuple[int, int]], list[int]]:
    """Cut points of two anchors of equal depth, and the stitching layer each one uses.

    A window of ``window`` units slides over ``0..depth-1`` with step ``stride``; every
    ``(j, k)`` with both ends in the window is a stitch, first discovery wins, and all new
    stitches of one window share one layer. DeiT (depth 12, window 2, stride 1): 34 stitches,
    11 layers.

    Returns:
        ``(cuts, layer_of)``: the ``(j, k)`` pairs in discovery order and, for each, its layer.
    """
    cuts: list[tuple[int, int]] = []
    layer_of: list[int] = []
    seen: set[tuple[int, int]] = set()
    n_layers = 0
    for start in range(0, depth, stride):
        ids = range(start, min(start + window, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen]
        for cut in new:
            seen.add(cut)
            cuts.append(cut)
            layer_of.append(n_layers)
        if new:
            n_layers += 1
    return cuts, layer_of


def short_names(names: list[str]) -> list[str]:
    """Readable anchor names: timm names without the ``_patchNN_RES`` tail, made unique."""
    short = [n.split("_patch")[0] for n in names]
    if len(set(short)) < len(short):
        short = [f"{s}#{i}" for i, s in enumerate(short)]
    return short


def enumerate_stitches(
    names: list[str], depths: list[int], config: SpaceConfig
) -> tuple[list[Stitch], list[int]]:
    """All stitches of a family, in reference order, and the number of layers per pair.

    Args:
        names: Anchor names, small to large.
        depths: Number of units of each anchor.
        config: Window and stride.

    Returns:
        ``(stitches, layers_per_pair)``.
    """
    if len(names) != len(depths):
        raise ValueError(f"{len(names)} anchor names but {len(depths)} depths")
    short = short_names(names)
    stitches = [
        Stitch(i, (i,), None, None, None, f"{short[i]}[0:{depths[i]}]") for i in range(len(names))
    ]
    layers_per_pair = []
    for p in range(len(names) - 1):
        a, b = p, p + 1
        if depths[a] != depths[b]:
            raise ValueError(
                f"anchors {names[a]} ({depths[a]} units) and {names[b]} ({depths[b]} units) "
                "differ in depth; paired stitching needs anchors of equal depth"
            )
        cuts, layer_of = paired_stitching(depths[a], config.window, config.stride)
        for (j, k), layer in zip(cuts, layer_of, strict=True):
            desc = f"{short[a]}[0:{j + 1}] -> {short[b]}[{k}:{depths[b]}]"
            stitches.append(Stitch(len(stitches), (a, b), (j, k), p, layer, desc))
        layers_per_pair.append(max(layer_of) + 1 if layer_of else 0)
    return stitches, layers_per_pair
