import pytest

from snnet_core import SpaceConfig, enumerate_stitches, paired_stitching


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


def test_unequal_depths_are_refused_with_names():
    with pytest.raises(ValueError, match="x .6 units. and y .4 units"):
        enumerate_stitches(["x", "y"], [6, 4], SpaceConfig())


@pytest.mark.parametrize("bad", [{"window": 0}, {"stride": 0}])
def test_space_config_validates(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        SpaceConfig(**bad)
