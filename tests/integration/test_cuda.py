"""The CUDA path: run only where a GPU is present (``bench/gpu_check.sh`` runs them there).

On a machine without one they are skipped, not passed: the suite's summary says so.
"""

import io

import httpx
import pytest
import torch
from PIL import Image

import snnet_core
from server.config import Settings
from server.engine import build_engine
from server.ingress import Ingress
from server.metrics import Metrics
from server.runner import InlineRunner
from tests._servers import ROOT, SnnetServer
from tests.conftest import build_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_every_stitch_on_the_gpu_matches_the_cpu_in_float32(digits):
    """Through the runner the server uses on CUDA (pinned staging, non-blocking copy): the same
    logits as the CPU, stitch by stitch, at batch 1 and at a full batch."""
    net = build_tiny(seed=5).eval()
    x = digits[0][:8]
    with torch.inference_mode():
        expected = {s: net(x, s) for s in range(len(net.stitches))}
    runner = InlineRunner(net.to(CUDA), CUDA, torch.float32, max_batch=8)
    for s, want in expected.items():
        for b in (1, 8):
            got = runner(x[:b], s)
            assert got.device.type == "cpu" and got.dtype == torch.float32
            torch.testing.assert_close(got, want[:b], rtol=1e-3, atol=1e-3)


def test_a_batch_larger_than_the_staging_buffer_still_runs(digits):
    net = build_tiny(seed=5).eval()
    x = digits[0][:4]
    with torch.inference_mode():
        want = net(x, 2)
    runner = InlineRunner(net.to(CUDA), CUDA, torch.float32, max_batch=2)
    torch.testing.assert_close(runner(x, 2), want, rtol=1e-3, atol=1e-3)


def test_the_engine_on_cuda_picks_the_thread_worker_and_a_measured_dtype(tmp_path, digits):
    net = build_tiny(seed=6).eval()
    snnet_core.save(net, tmp_path / "ckpt", snnet_core.new_manifest(net))
    settings = Settings(
        weights=tmp_path / "ckpt", device="cuda", max_batch_size=4,
        profile_cache=tmp_path / "profiles.json",
    )  # fmt: skip
    engine = build_engine(settings, Metrics(), Ingress())
    try:
        assert engine.device.type == "cuda" and engine.runner.kind == "thread"
        # No accuracy per dtype in this manifest: float32 is the only eligible dtype.
        assert engine.dtype == torch.float32
        assert engine.profile.fingerprint.device_type == "cuda"
        logits = engine.runner(digits[0][:3], 0)
        assert logits.shape == (3, net.num_classes)
    finally:
        engine.close()


def test_snnet_serve_on_cuda_classifies_the_bundled_digits(tmp_path, digits):
    images, labels = digits
    with SnnetServer(
        {
            "SNNET_WEIGHTS": str(ROOT / "weights"),
            "SNNET_DEVICE": "cuda",
            "SNNET_PROFILE_CACHE": str(tmp_path / "p.json"),
        }  # fmt: skip
    ) as srv:
        srv.wait_for("ready in")
        right = 0
        for i in range(16):
            r = httpx.post(
                f"{srv.url}/classify",
                files={"image": ("d.png", _png(images[i]), "image/png")},
                data={"latency_budget_ms": "200"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            right += int(r.json()["predictions"][0][0]["class_index"]) == int(labels[i])
        assert right >= 14
        stitches = httpx.get(f"{srv.url}/stitches").json()
        assert stitches["device"].startswith("cuda")


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((image[0] * 255).round().to(torch.uint8).numpy(), "L").save(buf, "PNG")
    return buf.getvalue()
