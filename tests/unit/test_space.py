import pytest

from snnet_core import SpaceConfig, enumerate_stitches, paired_stitching
from snnet_core.space import unpaired_stitching


def stage_ranges(depths):
    """Flat unit ranges of consecutive stages (no downsampling units)."""
    out, start = [], 0
    for d in depths:
        out.append(range(start, start + d))
        start += d
    return out


def test_paired_stitching_reference_depth12():
    cuts, layer_of = paired_stitching(12, window=2, stride=1)
    assert len(cuts) == 34
    assert len(set(layer_of)) == 11
    # First window discovers all four cuts in j-major order and they share layer 0.
    assert cuts[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layer_of[:4] == [0, 0, 0, 0]
    # Later windows add three new cuts each, on a new layer.
    assert cuts[4:7] == [(1, 2), (2, 1), (2, 2)] and layer_of[4:7] == [1, 1, 1]
    assert cuts[-1] == (11, 11) and layer_of[-1] == 10
    assert all(abs(j - k) <= 1 for j, k in cuts)


def test_window_and_stride_change_the_space():
    cuts, layers = paired_stitching(12, window=3, stride=3)
    assert len(set(layers)) == 4
    assert len(cuts) == 4 * 9
    cuts1, _ = paired_stitching(12, window=1, stride=1)
    assert cuts1 == [(j, j) for j in range(12)]


def test_enumeration_numbers_anchors_first_then_pairs():
    stitches, layers = enumerate_stitches(
        ["a_patch16", "b_patch16", "c_patch16"], [12, 12, 12], SpaceConfig()
    )
    assert len(stitches) == 71 and layers == [11, 11]
    assert [s.anchors for s in stitches[:3]] == [(0,), (1,), (2,)]
    assert all(s.anchors == (0, 1) for s in stitches[3:37])
    assert all(s.anchors == (1, 2) for s in stitches[37:])
    assert [s.id for s in stitches] == list(range(71))
    assert stitches[3 + 4 * 3 + 4].description == "a[0:6] -> b[6:12]"  # window 5: (5, 6)


def test_a_deeper_front_stage_is_refused_with_names():
    with pytest.raises(ValueError, match=r"stage 0 of x \(6 blocks\) is deeper .* y \(4 blocks\)"):
        enumerate_stitches(["x", "y"], [6, 4], SpaceConfig())


def test_paired_without_overlap_cuts_forward_only():
    cuts, layers = paired_stitching(18, overlap=False)
    assert cuts == [(j, j + 1) for j in range(17)] and layers == list(range(17))
    assert paired_stitching(2, overlap=False) == ([(0, 1)], [0])


def test_unpaired_stitching_matches_the_reference_nearest_mapping():
    cuts, layers = unpaired_stitching(6, 18, "reference")
    assert len(cuts) == 17 and max(layers) + 1 == 6
    assert cuts[:6] == [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6)]
    # The release pairs the t-th cut with layer floor(t / 3), not with its front block.
    assert layers[:6] == [0, 0, 0, 1, 1, 1]
    assert unpaired_stitching(2, 4, "reference") == ([(0, 1), (1, 2), (1, 3)], [0, 0, 1])
    five = [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    assert unpaired_stitching(2, 6, "reference") == (five, [0, 0, 0, 1, 1])
    # Our default: one layer per front block, same cuts, same number of layers.
    assert unpaired_stitching(2, 6) == (five, [0, 0, 1, 1, 1])
    assert unpaired_stitching(6, 18)[1] == [j for j, _ in cuts]
    with pytest.raises(ValueError, match="unpaired_layers must be 'front' or 'reference'"):
        SpaceConfig(unpaired_layers="back")


@pytest.mark.parametrize(
    ("depths", "cut_stages", "count", "layers"),
    [
        ([[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]], [0, 1, 2], 41, [8, 19]),  # Swin-T/S/B
        ([[2, 2, 2, 2], [3, 4, 6, 3]], [1, 2], 10, [4]),  # ResNet-18/50
        ([[2, 2, 2, 2], [2, 2, 6, 2]], [1, 2], 8, [3]),  # ResNet-18 -> Swin-T
    ],
)
def test_staged_families_give_the_reference_counts(depths, cut_stages, count, layers):
    names = [f"m{i}" for i in range(len(depths))]
    stitches, per_pair = enumerate_stitches(
        names,
        [stage_ranges(d) for d in depths],
        SpaceConfig(),
        cut_stages=[cut_stages] * (len(depths) - 1),
        overlap=[False] * (len(depths) - 1),
    )
    assert len(stitches) == count and per_pair == layers
    # Stage-major order after the anchors, pairs in order inside a stage.
    stages = [s.stage for s in stitches[len(depths) :]]
    assert stages == sorted(stages)
    for s in stitches[len(depths) :]:
        (j, k), (fj, fk) = s.stage_cut, s.cut
        a_start = stage_ranges(depths[s.anchors[0]])[s.stage].start
        b_start = stage_ranges(depths[s.anchors[1]])[s.stage].start
        assert (fj, fk) == (a_start + j, b_start + k) and j < k


@pytest.mark.parametrize("bad", [{"window": 0}, {"stride": 0}])
def test_space_config_validates(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        SpaceConfig(**bad)
