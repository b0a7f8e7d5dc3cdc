"""The stitch space: which routes exist, how they are numbered, which layer each one uses.

Reference numbering (SN-Net): ids ``0..A-1`` are the anchors, small to large; then, stage by stage
(the stages the family allows cuts in, in order), for each nearest-neighbour pair (0->1, 1->2,
...) in order, that pair's stitches in the order the reference discovers them. A stitch
``(j, k)`` runs the front anchor's units ``0..j``, the stitching layer, then the back anchor's
units ``k..end``; both ends lie inside one stage. DeiT has one stage; Swin cuts in stages 0-2 and
ResNet in stages 1-2, so their ids run over those stages in order. The layers of one pair are
numbered on from stage to stage.

Within one stage and one pair:

- equal depths: *paired* stitching, a window of ``window`` blocks sliding with ``stride``; each
  window's new cuts share one layer. With overlapping cuts (DeiT) every ``(j, k)`` in the window
  counts, so ``k`` in ``{j-1, j, j+1}``; without (Swin, ResNet) only ``j < k``, i.e. one cut
  ``(j, j+1)`` per window.
- the back deeper than the front: *unpaired* stitching (``unpaired_stitching``).

Counts that follow (all checked in tests): DeiT-Ti/S/B 3 + 34 + 34 = 71. Swin-T/S/B (depths
2-2-6-2, 2-2-18-2, 2-2-18-2): stage 0 gives 1 + 1, stage 1 gives 1 + 1, stage 2 gives 17 (T->S
unpaired, 6 against 18) + 17 (S->B paired, windows (i, i+1) for i = 0..16): 3 + 2 + 2 + 34 = 41.
ResNet-18/50 (2-2-2-2, 3-4-6-3), stages 1-2: unpaired 2 against 4 gives 3, 2 against 6 gives 5:
2 + 8 = 10. ResNet-18 -> Swin-T: stage 1 paired (2, 2) gives 1, stage 2 unpaired (2, 6) gives 5:
2 + 6 = 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SpaceConfig:
    """Options of the stitch space and of route semantics; stored in every checkpoint."""

    window: int = 2  # sliding-window size of paired stitching, in blocks
    stride: int = 1  # step of the sliding window, in blocks
    # False only for nets imported from the reference DeiT release, whose stitched routes end
    # with the back anchor's head *without* its final norm (anchor routes keep it).
    stitched_final_norm: bool = True
    # Which unpaired stitches share a layer: "front" (those leaving the same front block) or
    # "reference" (the release's assignment, for imported weights; see unpaired_stitching).
    unpaired_layers: str = "front"

    def __post_init__(self) -> None:
        if self.unpaired_layers not in ("front", "reference"):
            raise ValueError(
                f"unpaired_layers must be 'front' or 'reference', got {self.unpaired_layers!r}"
            )
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
        cut: ``(j, k)`` in flat unit indices for a stitched route (front runs units ``0..j``,
            back runs ``k..``); ``None`` for an anchor.
        pair: Index of the anchor pair (``front``), ``None`` for an anchor.
        layer: Index of the stitching layer within its pair, ``None`` for an anchor.
        description: Human-readable route, e.g. ``deit_tiny[0:5] -> deit_small[5:12]`` (flat
            units, one-stage families) or ``swin_tiny[:s2.3] -> swin_small[s2.9:]`` (front up
            to block 3 of stage 2, back from block 9 of stage 2).
        stage: Stage the cut lies in, ``None`` for an anchor.
        stage_cut: ``(j, k)`` as block indices inside ``stage``, ``None`` for an anchor.
    """

    id: int
    anchors: tuple[int, ...]
    cut: tuple[int, int] | None
    pair: int | None
    layer: int | None
    description: str
    stage: int | None = None
    stage_cut: tuple[int, int] | None = None

    @property
    def is_anchor(self) -> bool:
        return self.cut is None


def paired_stitching(
    depth: int, window: int = 2, stride: int = 1, overlap: bool = True
) -> tuple[list[tuple[int, int]], list[int]]:
    """Cut points of two stages of equal depth, and the stitching layer each one uses.

    A window of ``window`` blocks slides over ``0..depth-1`` with step ``stride``; every
    ``(j, k)`` with both ends in the window is a stitch (only ``j < k`` unless ``overlap``),
    first discovery wins, and all new stitches of one window share one layer. DeiT (depth 12,
    window 2, stride 1, overlap): 34 stitches, 11 layers. Without overlap: ``depth - 1`` of each.

    Returns:
        ``(cuts, layer_of)``: the ``(j, k)`` pairs in discovery order and, for each, its layer.
    """
    cuts: list[tuple[int, int]] = []
    layer_of: list[int] = []
    seen: set[tuple[int, int]] = set()
    n_layers = 0
    for start in range(0, depth, stride):
        ids = range(start, min(start + window, depth))
        new = [(j, k) for j in ids for k in ids if (j, k) not in seen and (overlap or j < k)]
        for cut in new:
            seen.add(cut)
            cuts.append(cut)
            layer_of.append(n_layers)
        if new:
            n_layers += 1
    return cuts, layer_of


def unpaired_stitching(
    front_depth: int, back_depth: int, layers: str = "front"
) -> tuple[list[tuple[int, int]], list[int]]:
    """Cut points of a stage against a deeper one (the reference's "unpaired" stitching).

    Block ``i`` of the back stage is matched to front block ``m[i] = floor(i * front / back)``
    (nearest interpolation of the front's block ids to the back's depth). Every ``(m[i], i)``
    with ``m[i] < i`` is a stitch, ordered by front block then back block. Swin-T -> Swin-S
    stage 2 (6 against 18): 17 stitches ``(0,1), (0,2), (1,3), (1,4), (1,5), (2,6), ...``, 6
    layers.

    Layers: with ``layers="front"`` the stitches leaving one front block share its layer, so a
    layer is fitted to one kind of input. The reference release instead gives the ``t``-th
    stitch layer ``m[t]``, which shifts the runs by one (``(0,1), (0,2), (1,3)`` share layer 0);
    a least-squares layer averaged over two different front blocks can then fit worse than no
    fit at all (seen on ResNet-18/50 in tests), so ``"reference"`` is kept for imported
    release weights only.

    Returns:
        ``(cuts, layer_of)`` as for ``paired_stitching``.
    """
    if front_depth > back_depth:
        raise ValueError(
            f"unpaired stitching needs the back stage at least as deep as the front, got "
            f"{front_depth} front blocks against {back_depth}; order anchors small to large"
        )
    # Integer form of torch's nearest interpolation; the same indices for every depth pair
    # used here (ratios 1/2 and 1/3).
    match = [i * front_depth // back_depth for i in range(back_depth)]
    cuts = [(j, i) for j in range(front_depth) for i, m in enumerate(match) if m == j and j < i]
    if layers == "reference":
        return cuts, match[: len(cuts)]
    if layers != "front":
        raise ValueError(f"layers must be 'front' or 'reference', got {layers!r}")
    return cuts, [j for j, _ in cuts]


def short_names(names: list[str]) -> list[str]:
    """Readable anchor names: timm names without the ``_patchNN_RES`` tail, made unique."""
    short = [n.split("_patch")[0] for n in names]
    if len(set(short)) < len(short):
        short = [f"{s}#{i}" for i, s in enumerate(short)]
    return short


def enumerate_stitches(
    names: list[str],
    stages: Sequence[int | Sequence[range]],
    config: SpaceConfig,
    *,
    cut_stages: Sequence[Sequence[int]] | None = None,
    overlap: Sequence[bool] | None = None,
) -> tuple[list[Stitch], list[int]]:
    """All stitches of a family, in reference order, and the number of layers per pair.

    Args:
        names: Anchor names, small to large.
        stages: Per anchor, the flat unit indices of each stage's blocks; an int ``n`` stands
            for one stage of ``n`` units (ViT).
        config: Window and stride.
        cut_stages: Per pair, the stages it may cut in (default: stage 0).
        overlap: Per pair, whether paired stitching includes cuts with ``k <= j`` (default:
            yes, as DeiT).

    Returns:
        ``(stitches, layers_per_pair)``.
    """
    if len(names) != len(stages):
        raise ValueError(f"{len(names)} anchor names but {len(stages)} stage lists")
    stage_units = [[range(s)] if isinstance(s, int) else list(s) for s in stages]
    n_pairs = len(names) - 1
    cut_stages = [[0]] * n_pairs if cut_stages is None else [list(c) for c in cut_stages]
    overlap = [True] * n_pairs if overlap is None else list(overlap)
    short = short_names(names)
    one_stage = all(len(s) == 1 for s in stage_units)

    def label(i: int) -> str:
        if one_stage:
            return f"{short[i]}[0:{len(stage_units[i][0])}]"
        return f"{short[i]}[{','.join(str(len(r)) for r in stage_units[i])}]"

    stitches = [Stitch(i, (i,), None, None, None, label(i)) for i in range(len(names))]
    layers_per_pair = [0] * n_pairs
    for st in sorted({s for c in cut_stages for s in c}):
        for p in range(n_pairs):
            if st not in cut_stages[p]:
                continue
            a, b = p, p + 1
            for i in (a, b):
                if st >= len(stage_units[i]):
                    raise ValueError(f"anchor {names[i]} has no stage {st} to stitch in")
            ra, rb = stage_units[a][st], stage_units[b][st]
            if len(ra) == len(rb):
                cuts, layer_of = paired_stitching(len(ra), config.window, config.stride, overlap[p])
            elif len(ra) < len(rb):
                cuts, layer_of = unpaired_stitching(len(ra), len(rb), config.unpaired_layers)
            else:
                raise ValueError(
                    f"stage {st} of {names[a]} ({len(ra)} blocks) is deeper than that of the "
                    f"next anchor {names[b]} ({len(rb)} blocks); order anchors small to large"
                )
            base = layers_per_pair[p]
            for (j, k), layer in zip(cuts, layer_of, strict=True):
                fj, fk = ra[j], rb[k]  # flat unit indices
                if one_stage:
                    desc = f"{short[a]}[0:{fj + 1}] -> {short[b]}[{fk}:{len(rb)}]"
                else:
                    desc = f"{short[a]}[:s{st}.{j}] -> {short[b]}[s{st}.{k}:]"
                stitches.append(
                    Stitch(len(stitches), (a, b), (fj, fk), p, base + layer, desc, st, (j, k))
                )
            layers_per_pair[p] = base + (max(layer_of) + 1 if layer_of else 0)
    return stitches, layers_per_pair
