import json

import pytest
import torch

import snnet_core
from snnet_core import CheckpointError, load, save
from snnet_core.checkpoint import MANIFEST_FILE, WEIGHTS_FILE
from tests.conftest import TINY_NUM_STITCHES, build_tiny


@pytest.fixture
def saved(tmp_path, train_digits):
    net = build_tiny(seed=5).eval()
    net.init_stitching_layers(train_digits)
    manifest = save(net, tmp_path / "ckpt")
    return net, manifest, tmp_path / "ckpt"


def test_round_trip_gives_identical_outputs_for_every_stitch(saved, digits):
    net, _, path = saved
    loaded, manifest = load(path)
    assert not loaded.training
    with torch.no_grad():
        for s in range(TINY_NUM_STITCHES):
            assert torch.equal(loaded(digits[0], s), net(digits[0], s))
    assert manifest.config.to_dict() == net.config.to_dict()


def test_manifest_is_self_describing(saved):
    net, manifest, path = saved
    raw = json.loads((path / MANIFEST_FILE).read_text())
    assert raw["schema_version"] == 1 and raw["family"] == "vit"
    assert raw["config"]["anchors"][0]["overrides"]["embed_dim"] == 16
    assert raw["config"]["space"] == {
        "window": 2,
        "stride": 1,
        "stitched_final_norm": True,
        "unpaired_layers": "front",
    }
    assert len(raw["stitches"]) == TINY_NUM_STITCHES
    row = raw["stitches"][5]
    assert set(row) >= {"id", "description", "anchors", "cut", "gflops", "params_m", "accuracy"}
    assert row["anchors"] == [net.anchor_names[0], net.anchor_names[1]]
    assert raw["labels"] == [str(i) for i in range(10)]
    assert raw["preprocessing"]["input_size"] == [1, 28, 28]
    assert len(raw["preprocessing"]["mean"]) == 1
    assert len(raw["weights_sha256"]) == 64


def test_profiles_survive_the_round_trip(saved):
    net, manifest, path = saved
    profile = snnet_core.measure_latency(net, [0, 5], [1, 2], warmup=0, repeats=1)
    manifest.set_profile(profile)
    snnet_core.write_manifest(path, manifest)
    _, again = load(path)
    got = again.profile_for(profile.fingerprint)
    assert got is not None and got.latency_ms == profile.latency_ms


def test_tampered_weights_are_refused(saved):
    _, _, path = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-10] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors does not match its manifest: sha256"
    ):
        load(path)


def test_missing_files_and_bad_manifests_name_the_file(saved, tmp_path):
    _, _, path = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    (path / WEIGHTS_FILE).rename(path / "other")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load(path)
    (path / "other").rename(path / WEIGHTS_FILE)

    raw = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(
        CheckpointError, match="schema_version 99; this snnet-serve reads schema_version 1"
    ):
        load(path)
    (path / MANIFEST_FILE).write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(
        CheckpointError, match=r"manifest\.json is malformed: unknown manifest keys \['surprise'\]"
    ):
        load(path)
    (path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is not valid JSON"):
        load(path)


def test_weights_of_another_architecture_are_refused(saved, tmp_path):
    _, _, path = saved
    other = snnet_core.build_snnet(
        "vit_tiny_patch16_224,vit_small_patch16_224",
        overrides={
            "img_size": 28,
            "patch_size": 7,
            "in_chans": 1,
            "num_classes": 10,
            "depth": 4,
            "embed_dim": 16,
            "num_heads": 2,
        },
    )
    save(other, tmp_path / "other")
    (tmp_path / "other" / MANIFEST_FILE).write_text((path / MANIFEST_FILE).read_text())
    raw = json.loads((path / MANIFEST_FILE).read_text())
    raw["weights_sha256"] = snnet_core.checkpoint.sha256_file(tmp_path / "other" / WEIGHTS_FILE)
    (tmp_path / "other" / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        load(tmp_path / "other")
