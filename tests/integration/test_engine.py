"""Start-up on a real tiny checkpoint: a stored latency profile is checked on this machine."""

import torch

import snnet_core
from server.config import Settings
from server.engine import build_engine
from server.ingress import Ingress
from server.metrics import Metrics
from tests.conftest import build_tiny


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
        assert engine.profile_source.endswith("rescaled")
        assert 2.0 < engine.controller.device_factor < 8.0  # about 4
        # Every prediction, measured stitch or not, carries the factor from the first request.
        for s in (0, 7, 22):
            predicted = engine.latency.predict_ms(s, 1)
            assert predicted > 2.0 * optimistic.latency_ms[s][1]
    finally:
        engine.close()
