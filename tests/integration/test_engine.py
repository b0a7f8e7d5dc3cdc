"""Start-up on a real tiny checkpoint: a stored latency profile is checked on this machine."""

import pytest
import torch

import snnet_core
from server.config import Settings
from server.engine import build_engine
from server.ingress import Ingress
from server.metrics import Metrics
from tests.conftest import build_tiny

# Its checks compare what start-up measures with what it measured moments before.
pytestmark = pytest.mark.timing  # `make test` runs it alone (pyproject's markers)


def test_a_stored_profile_that_this_machine_does_not_match_is_rescaled(tmp_path):
    """The manifest's profile carries this machine's fingerprint (same CPU name, threads, torch)
    but claims 4x faster times, as a faster VM with the same CPU name would have measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = build_tiny(seed=3).eval()
        measured = snnet_core.measure_latency(net, None, [1, 2], warmup=2, repeats=5)
        optimistic = snnet_core.LatencyProfile(
            measured.fingerprint,
            measured.batch_sizes,
            {s: {b: ms / 4 for b, ms in per.items()} for s, per in measured.latency_ms.items()},
        )
        manifest = snnet_core.new_manifest(net)
        manifest.profiles = [optimistic]
        snnet_core.save(net, tmp_path / "ckpt", manifest)
        settings = Settings(
            weights=tmp_path / "ckpt", threads=1, worker="thread", max_batch_size=2,
            profile_cache=tmp_path / "profiles.json",
        )  # fmt: skip
        engine = build_engine(settings, Metrics(), Ingress())
    finally:
        torch.set_num_threads(threads)
    try:
        assert engine.profile_source.startswith("manifest; calibrated x")
        assert ", rescaled (x" in engine.profile_source
        # Every prediction is mapped onto this machine before the first request: about 4x.
        for s in (0, 7, 22):
            for b in (1, 2):
                predicted = engine.latency.predict_ms(s, b)
                assert (
                    2.0 * optimistic.latency_ms[s][b] < predicted < 8.0 * measured.latency_ms[s][b]
                )
        assert engine.profile == optimistic  # what the manifest said is kept as it was
    finally:
        engine.close()


def test_start_up_measures_what_its_time_allows_and_estimates_the_rest(tmp_path):
    """SNNET_PROFILE_SECONDS=0: only the anchors are measured, the rest estimated from GFLOPs;
    the cache keeps the anchors, and the next start with time measures the rest."""
    net = build_tiny(seed=4).eval()
    manifest = snnet_core.new_manifest(net)
    snnet_core.save(net, tmp_path / "ckpt", manifest)
    common = dict(
        weights=tmp_path / "ckpt", threads=1, worker="thread", max_batch_size=2,
        profile_cache=tmp_path / "profiles.json", profile_repeats=2,
    )  # fmt: skip
    threads = torch.get_num_threads()
    try:
        first = build_engine(Settings(**common, profile_seconds=0), Metrics(), Ingress())
        first.close()
        second = build_engine(Settings(**common, profile_seconds=60), Metrics(), Ingress())
        second.close()
    finally:
        torch.set_num_threads(threads)
    anchors = {r.id for r in first.menu.rows if len(r.anchors) == 1}
    assert anchors == {0, 1, 2}
    assert first.estimated == frozenset(range(len(first.menu))) - anchors
    assert "measured 3 stitches" in first.profile_source
    # Measured where it serves (a thread worker here: a call is all forward), and calibrated
    # from those calls: at batch 1 the map is x1 + 0 ms, the anchors serve as measured.
    for s in anchors:
        assert first.latency.base_ms(s, 1) == pytest.approx(
            first.profile.latency_ms[s][1], rel=0.01
        )
    assert "20 estimated" in first.profile_source
    for s in first.estimated:  # every stitch has a time at every batch size, in a sane range
        assert set(first.profile.latency_ms[s]) == {1, 2}
        assert 0 < first.profile.latency_ms[s][1] < 100
    assert second.estimated == frozenset() and "measured 20 stitches" in second.profile_source
    for s in anchors:  # reused from the cache, not measured again
        assert second.profile.latency_ms[s] == first.profile.latency_ms[s]


def test_threads_are_chosen_by_measurement_and_the_figures_are_logged(tmp_path, caplog):
    from server.environ import cores

    net = build_tiny(seed=5).eval()
    snnet_core.save(net, tmp_path / "ckpt")
    settings = Settings(
        weights=tmp_path / "ckpt", worker="thread", max_batch_size=1,
        profile_cache=tmp_path / "profiles.json", profile_repeats=1,
    )  # fmt: skip
    assert settings.threads == "auto"
    threads = torch.get_num_threads()
    caplog.set_level("INFO", logger="snnet.engine")
    try:
        engine = build_engine(settings, Metrics(), Ingress())
        chosen = torch.get_num_threads()
        engine.close()
    finally:
        torch.set_num_threads(threads)
    n = cores()
    assert chosen in ({n - 1, n} if n > 1 else {1})
    line = next(r.message for r in caplog.records if r.message.startswith("threads:"))
    if 1 < n < 11:  # from 11 cores up the last core cannot gain 1.1x: not timed
        assert line.startswith(f"threads: {chosen} (SNNET_THREADS=auto; largest anchor (stitch ")
        assert "smallest anchor (stitch " in line
        assert f" {n - 1} thread{'s' if n > 2 else ''} " in line and f" {n} threads " in line
        assert "ms (the front end's work for one request)" in line
    else:
        assert ("1 core" if n == 1 else "a model can gain at most") in line
    assert engine.profile.fingerprint.threads == chosen  # the profile was measured with them


def test_dtype_auto_takes_float32_unless_another_dtype_keeps_the_accuracy(tmp_path, caplog):
    net = build_tiny(seed=6).eval()
    manifest = snnet_core.new_manifest(net)
    acc = {str(r["id"]): 90.0 for r in manifest.stitches}
    settings = Settings(
        weights=tmp_path / "ckpt", worker="thread", threads=1, max_batch_size=1,
        profile_cache=tmp_path / "profiles.json", profile_repeats=1,
    )  # fmt: skip
    assert settings.dtype == "auto"
    caplog.set_level("INFO", logger="snnet.engine")
    threads = torch.get_num_threads()
    try:
        snnet_core.save(net, tmp_path / "ckpt", manifest)  # no accuracy per dtype recorded
        first = build_engine(settings, Metrics(), Ingress())
        first.close()
        # bfloat16 recorded 0.4 points below float32 on every stitch: eligible, measured.
        manifest.evaluation = {"accuracy_by_dtype": {
            "float32": acc, "bfloat16": {k: v - 0.4 for k, v in acc.items()}}}  # fmt: skip
        snnet_core.save(net, tmp_path / "ckpt", manifest)
        second = build_engine(settings, Metrics(), Ingress())
        second.close()
    finally:
        torch.set_num_threads(threads)
    lines = [r.message for r in caplog.records if r.message.startswith("dtype:")]
    assert first.dtype == torch.float32
    assert lines[0].startswith("dtype: float32 (SNNET_DTYPE=auto; the only dtype eligible")
    # (neither is recorded: both commands, float32's first)
    assert "bfloat16 is not: the checkpoint lacks bfloat16 and float32 held-out accuracy for " \
        "some stitch, on one split; `snnet eval --dtype float32 --write` then `snnet eval " \
        "--dtype bfloat16 --write` on the same data records it" in lines[0]  # fmt: skip
    assert second.dtype in (torch.float32, torch.bfloat16)
    assert "float32 " in lines[1] and "bfloat16 " in lines[1] and " ms" in lines[1]
    # Trying bfloat16 did not round the weights it serves with.
    served = next(second.net.parameters())
    torch.testing.assert_close(served, next(first.net.parameters()).to(served.dtype))
