"""A planner over a real scheduler, controller and HTTP backlog, with a known latency profile:
stitch s costs (s + 1) ms per image and is the (s + 1)-th most accurate (23 is the best)."""

from __future__ import annotations

import torch

from server.controller import Controller
from server.ingress import Ingress
from server.latency import LatencyModel
from server.metrics import Metrics
from server.planner import Planner
from server.runner import InlineRunner
from server.scheduler import Scheduler
from snnet_core import DeviceFingerprint, LatencyProfile, StitchMenu, StitchRow
from tests.conftest import TINY_NUM_STITCHES, build_tiny

N = TINY_NUM_STITCHES
NOW = 1000.0  # the injected clock: monotonic seconds


def per_image(s: int, b: int) -> float:
    return (s + 1.0) * b


def profile(ms_of=per_image) -> LatencyProfile:
    fp = DeviceFingerprint.current("cpu", torch.float32)
    sizes = [1, 2, 4, 8]
    return LatencyProfile(fp, sizes, {s: {b: ms_of(s, b) for b in sizes} for s in range(N)})


def menu() -> StitchMenu:
    return StitchMenu.of(
        StitchRow(s, f"stitch {s}", ("a",), gflops=(s + 1) * 1e-3, params_m=0.1, accuracy=70.0 + s)
        for s in range(N)
    )


def make(ms_of=per_image, *, max_batch=4, max_queue=64, **planner_kw):
    """(planner, scheduler, net); the scheduler's worker is not started unless a test does."""
    net = build_tiny().eval()
    m = menu()
    latency = LatencyModel(profile(ms_of))
    runner = InlineRunner(net, torch.device("cpu"), torch.float32)
    sched = Scheduler(
        latency, runner, stitches=N, max_batch=max_batch, max_wait_ms=0, max_queue=max_queue,
        metrics=Metrics(),
    )  # fmt: skip
    controller = Controller(latency, m.ranking, max_batch=max_batch, scores=m.scores)
    controller.margin = controller.rest_margin = 0.0  # none unless a test says so (no steps)
    ingress = Ingress(prior_ms=0.0)  # no HTTP work unless a test says so
    ingress.seed([(0, 0.0)])
    planner = Planner(
        m, sched, controller, ingress, default_budget_ms=planner_kw.pop("default_budget_ms", 1000.0),
        **planner_kw,
    )  # fmt: skip
    return planner, sched, net
