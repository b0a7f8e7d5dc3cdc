"""The Engine: everything start-up builds, typed and fixed once built; and the start-up itself.

``build_engine`` loads and checks the checkpoint, chooses the latency profile (the manifest's,
the cache's, or a fresh measurement on this device), starts the model where it runs
(``server.runner``), and wires the latency model, scheduler, controller and planner together.
Routes receive the Engine through one dependency (``server.routes.deps``); before it exists
they answer 503 from there, so nothing on the request path checks readiness or reads an
attribute that may be unset. ``Lifecycle`` is what the app holds before and after that.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import snnet_core
from snnet_core import (
    DeviceFingerprint,
    LatencyProfile,
    Manifest,
    SNNet,
    StitchMenu,
    resolve_device,
    resolve_dtype,
)

from .config import Settings
from .controller import Controller, Fleet, PrometheusSource, read_metrics
from .imaging import decode_cost_points, make_transform
from .ingress import Ingress
from .latency import LatencyModel
from .metrics import Metrics
from .planner import Plan, Planner
from .runner import InlineRunner, ProcessRunner, RunnerError
from .scheduler import Result, Scheduler

log = logging.getLogger("snnet.engine")


class StartupCancelled(Exception):
    """Start-up was asked to stop (SIGTERM or Ctrl-C before the engine was built)."""


SWITCH_INTERVAL_S = 0.0002


@dataclass(frozen=True)
class Engine:
    """The served model and the machinery around it; built once by ``build_engine``."""

    settings: Settings
    metrics: Metrics
    net: SNNet
    manifest: Manifest
    menu: StitchMenu
    device: torch.device
    dtype: torch.dtype
    transform: Callable  # PIL image -> (C, H, W) float32, as the manifest says
    profile: LatencyProfile
    profile_source: str  # "manifest", "cache <path>" or "measured ..."
    latency: LatencyModel
    runner: InlineRunner | ProcessRunner
    scheduler: Scheduler
    controller: Controller
    ingress: Ingress
    planner: Planner

    def record_answer(
        self, plan: Plan, result: Result, images: int, payload_bytes: int, total_ms: float
    ) -> bool:
        """Fold one answered request into the metrics, the HTTP-cost estimate and the safety
        margin; whether it met its budget."""
        http = total_ms - result.queue_ms - result.compute_ms
        self.ingress.observe(payload_bytes, http - plan.spent_ms - plan.ingress_ms, http)
        # The margin covers what the planner cannot plan: HTTP work and compute running over the
        # prediction. Not the queue wait: under earliest-deadline-first a request may wait longer
        # than predicted by design, for one due sooner, within its deadline (admission checks it).
        self.controller.observe_residual(total_ms - result.queue_ms - plan.outside_queue_ms)
        met = total_ms + self.settings.network_ms <= plan.budget_ms
        m = self.metrics
        m.stitch_chosen.labels(str(plan.stitch)).inc()
        m.gflops_served.inc(self.menu.rows[plan.stitch].gflops * images)
        (m.budget_met if met else m.budget_missed).inc()
        return met

    def step_controller(self, now: float) -> None:
        """One controller iteration: read the metrics, update, publish the state."""
        c, m = self.controller, self.metrics
        # The queue term looks at work waiting, not at the batch in flight: one request being
        # served is not load, and counting it made the level flicker on a nearly idle server.
        c.update(read_metrics(m, self.scheduler.queued_work_ms()))
        m.queue_predicted_wait.set(self.scheduler.predicted_wait_ms(now) / 1e3)
        m.load_level.set(c.level)
        m.arrival_rate.set(c.arrival_rate)
        m.controller_updates.inc()
        for stitch, value in c.latency.corrections().items():
            m.latency_correction.labels(str(stitch)).set(value)

    def close(self) -> None:
        """Answer everything accepted, then stop the model."""
        log.info("draining %d queued images", self.scheduler.queued_images)
        self.scheduler.stop()
        self.runner.close()


def default_threads(device: torch.device) -> int | None:
    """On CPU, one thread fewer than the cores this process may use (at least 1): the event loop
    parses, decodes and answers on a core of its own. torch's default (one per core) makes the
    model's threads and the event loop fight under load, and OpenMP threads that lose a core
    stall the whole forward: on 2 cores a burst made batches 8x slower than profiled."""
    if device.type != "cpu":
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def build_engine(
    settings: Settings,
    metrics: Metrics,
    ingress: Ingress,
    status: Callable[[str], None] = lambda _: None,
    cancel: threading.Event | None = None,
) -> Engine:
    """Load, profile, warm up and wire everything; ``status`` hears each stage (for /readyz).

    ``cancel`` is checked between stages and between measurements: setting it makes start-up
    stop within one measurement or warm-up forward.

    Raises:
        CheckpointError: the weights are missing or corrupt.
        ValueError: the device or dtype cannot be used here.
        StartupCancelled: ``cancel`` was set.
    """
    s = settings

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise StartupCancelled("start-up cancelled")

    def stage(detail: str) -> None:
        check()
        status(detail)

    t0 = time.perf_counter()
    device = resolve_device(s.device)
    dtype = resolve_dtype(s.dtype, device)
    worker = s.worker if s.worker != "auto" else ("process" if device.type == "cpu" else "thread")
    if worker == "process" and device.type != "cpu":
        raise ValueError(
            f"SNNET_WORKER=process runs CPU models only but the device is {device}; "
            "use SNNET_WORKER=thread (or auto)"
        )
    # With SNNET_WORKER=thread the worker needs the GIL back after every torch op; while the
    # event loop parses requests it would wait up to Python's switch interval (5 ms) each time,
    # and a forward of a few hundred ops became 10x slower than profiled under a burst. Hand over
    # sooner. (The process worker avoids the wait altogether.)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    threads = s.threads or default_threads(device)
    if threads:
        torch.set_num_threads(threads)
    stage("loading checkpoint")
    net, manifest = snnet_core.load(s.weights)
    net = net.to(device, dtype).eval()
    menu = StitchMenu.of(manifest.stitches)
    log.info(
        "loaded %s: %s, %d stitches, on %s %s (%.1fs)", s.weights, ",".join(net.anchor_names),
        len(menu), device, s.dtype, time.perf_counter() - t0,
    )  # fmt: skip
    stage("latency profile")
    profile, source = _choose_profile(s, net, manifest, device, dtype, check, cancel)
    latency = LatencyModel(profile)
    # Warm up where the model will run, at the smallest and the largest batch it will see.
    warm = sorted({1, s.max_batch_size})
    if worker == "process":
        stage("starting the model process and warming up")
        try:
            runner = ProcessRunner(net, dtype, threads, warm, cancelled=cancel)
        except RunnerError:
            check()  # cancelled: say so, not "failed"
            raise
    else:
        stage("warming up")
        runner = InlineRunner(net, device, dtype)
        runner.warm_up(warm, check)
    try:
        check()
    except StartupCancelled:
        runner.close()
        raise
    transform = make_transform(manifest.preprocessing)
    points = decode_cost_points(transform)
    ingress.seed(points)
    log.info(
        "decoding and preprocessing here: %s",
        ", ".join(f"{b} bytes {ms:.2f} ms" for b, ms in points),
    )
    stage("calibrating the latency profile")
    factor, calibration = _calibrate(net, runner, latency, warm, check)
    source = f"{source}; {calibration}"
    scheduler = Scheduler(
        latency, runner, stitches=len(menu), max_batch=s.max_batch_size,
        max_wait_ms=s.max_batch_wait_ms, max_queue=s.max_queue, metrics=metrics,
    )  # fmt: skip
    controller = Controller(
        latency, menu.ranking, max_batch=s.max_batch_size, scores=menu.scores,
        target_utilisation=s.target_utilisation, device_factor=factor,
    )  # fmt: skip
    planner = Planner(
        menu, scheduler, controller, ingress, default_budget_ms=s.default_budget_ms,
        network_ms=s.network_ms, baseline_policies=s.baseline_policies,
    )  # fmt: skip
    scheduler.start()
    metrics.model.info(
        {
            "anchors": ",".join(net.anchor_names), "family": net.family, "stitches": str(len(menu)),
            "device": str(device), "dtype": s.dtype, "weights_sha256": manifest.weights_sha256[:16],
            "profile": source, "worker": runner.kind,
        }
    )  # fmt: skip
    for i in range(len(menu)):
        metrics.latency_correction.labels(str(i)).set(1.0)
    log.info("ready in %.1fs (profile: %s)", time.perf_counter() - t0, source)
    return Engine(
        settings=s, metrics=metrics, net=net, manifest=manifest, menu=menu, device=device,
        dtype=dtype, transform=transform, profile=profile,
        profile_source=source, latency=latency, runner=runner, scheduler=scheduler,
        controller=controller, ingress=ingress, planner=planner,
    )  # fmt: skip


# -- the latency profile ----------------------------------------------------------------------


def default_cache_path(settings: Settings, sha: str) -> Path:
    if settings.profile_cache is not None:
        return settings.profile_cache
    if os.access(settings.weights, os.W_OK):
        return settings.weights / "profiles.json"
    return Path.home() / ".cache" / "snnet" / f"profiles-{sha[:16]}.json"


def _covers(profile: LatencyProfile, stitches: int, batch_sizes: list[int]) -> bool:
    return set(profile.latency_ms) >= set(range(stitches)) and all(
        set(per_bs) >= set(batch_sizes) for per_bs in profile.latency_ms.values()
    )


def _choose_profile(
    s: Settings,
    net: SNNet,
    manifest: Manifest,
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[[], None],
    stop: threading.Event | None,
) -> tuple[LatencyProfile, str]:
    """The manifest's profile for this device, else the cache's, else a fresh measurement (kept
    in the cache); and where it came from."""
    fp = DeviceFingerprint.current(device, dtype)
    sizes = s.batch_sizes()
    found = manifest.profile_for(fp)
    if found and _covers(found, len(net.stitches), sizes):
        return found, "manifest"
    cache = default_cache_path(s, manifest.weights_sha256)
    cached = _read_cache(cache, manifest.weights_sha256)
    for p in cached:
        if p.fingerprint == fp and _covers(p, len(net.stitches), sizes):
            return p, f"cache {cache}"
    log.info(
        "no latency profile for this device (%s, %s, %d threads): measuring %d stitches x batch "
        "sizes %s", fp.device_name, fp.dtype, fp.threads, len(net.stitches), sizes,
    )  # fmt: skip

    def progress(done: int, total: int) -> None:
        check()
        _log_progress(done, total)

    try:
        profile = snnet_core.measure_latency(
            net, None, sizes, warmup=1, repeats=s.profile_repeats, progress=False,
            on_progress=progress, stop=stop,
        )  # fmt: skip
    except InterruptedError:
        check()
        raise
    cached = [p for p in cached if p.fingerprint != fp] + [profile]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        body = {
            "weights_sha256": manifest.weights_sha256,
            "profiles": [p.to_dict() for p in cached],
        }
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, cache)
        return profile, f"measured, kept in {cache}"
    except OSError as e:
        log.warning("could not write the profile cache %s: %s", cache, e)
        return profile, "measured (not cached)"


CALIBRATION_TOLERANCE = 0.15
CALIBRATION_REPEATS = 3


def _calibrate(
    net: SNNet,
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    latency: LatencyModel,
    batch_sizes: list[int],
    check: Callable[[], None],
) -> tuple[float, str]:
    """Time the anchors where the model serves (through ``runner``: the same process layout,
    threads and pipe as requests) against the profile; the device factor to start from, and
    what was found.

    A profile from the manifest or the cache names a CPU model, but on a virtual machine that
    is not an identity: a slower machine with the same name used to inherit a faster one's
    profile. Within ``CALIBRATION_TOLERANCE`` the profile is trusted as it is; otherwise every
    prediction is rescaled by the median ratio (the controller refines it online).
    """
    anchors = [st.id for st in net.stitches if not st.cut]
    ratios = []
    for b in batch_sizes:
        x = torch.zeros(b, *net.input_size)
        for a in anchors:
            times = []
            for _ in range(CALIBRATION_REPEATS):
                check()
                t0 = time.perf_counter()
                runner(x, a)
                times.append((time.perf_counter() - t0) * 1e3)
            ratios.append(statistics.median(times) / latency.base_ms(a, b))
    ratio = statistics.median(ratios)
    spread = f"anchors ran x{min(ratios):.2f}..x{max(ratios):.2f} of the profile here"
    if abs(ratio - 1.0) <= CALIBRATION_TOLERANCE:
        log.info("calibration: %s (median x%.2f): within %.0f%%, profile trusted",
                 spread, ratio, CALIBRATION_TOLERANCE * 100)  # fmt: skip
        return 1.0, f"calibrated x{ratio:.2f}, trusted"
    log.warning("calibration: %s (median x%.2f): outside %.0f%%, every prediction rescaled by it",
                spread, ratio, CALIBRATION_TOLERANCE * 100)  # fmt: skip
    return ratio, f"calibrated x{ratio:.2f}, rescaled"


def _log_progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        log.info("profiling: %d/%d measurements", done, total)


def _read_cache(path: Path, sha: str) -> list[LatencyProfile]:
    try:
        if not path.is_file():
            return []
        raw = json.loads(path.read_text())
        if raw.get("weights_sha256") != sha:
            return []
        return [LatencyProfile.from_dict(p) for p in raw["profiles"]]
    except Exception as e:  # any unreadable cache is ignored, never fatal
        log.warning("ignoring unreadable profile cache %s: %s", path, e)
        return []


# -- the app's view: before, during and after start-up ----------------------------------------


class Lifecycle:
    """Holds the Engine once ``start`` built it, and what start-up is doing until then.

    Args:
        settings: The service settings.
        metrics: The app's metrics (they exist before the engine: /metrics always answers).
        ingress: The app's HTTP backlog estimate (the loop-lag watcher runs from the start).
    """

    def __init__(self, settings: Settings, metrics: Metrics, ingress: Ingress) -> None:
        self.settings, self.metrics, self.ingress = settings, metrics, ingress
        self.engine: Engine | None = None
        self.detail = "loading"
        self.started = threading.Event()  # set when start() finished, well or not
        self.cancel = threading.Event()  # set to stop start-up early

    def _status(self, detail: str) -> None:
        self.detail = detail

    def start(self) -> None:
        """Build the engine (blocking: run it in a thread); a failure is logged and kept in
        ``detail`` for /readyz."""
        try:
            engine = build_engine(
                self.settings, self.metrics, self.ingress, self._status, self.cancel
            )
            # Move everything start-up made (the model, timm, torch, FastAPI: ~400k objects) out
            # of the collector's reach: a full collection over them took ~200 ms here, and one
            # under load stalled every request in flight past its budget.
            gc.collect()
            gc.freeze()
            self.engine, self.detail = engine, "ready"
            self.metrics.ready.set(1)
        except StartupCancelled:
            self.detail = "start-up cancelled"
            log.info("start-up cancelled")
        except Exception as e:
            self.detail = f"start-up failed: {e}"
            log.exception("start-up failed")
        finally:
            self.started.set()

    def start_in_background(self) -> threading.Thread:
        """``start`` in a daemon thread: a process told to stop during start-up need not wait
        for it (see ``shutdown``)."""
        thread = threading.Thread(target=self.start, name="snnet-startup", daemon=True)
        thread.start()
        return thread

    async def shutdown(self, startup_wait_s: float = 1.0) -> None:
        """Stop: during start-up, cancel it and wait at most ``startup_wait_s`` (start-up stops
        within one measurement or forward; the process may exit without it); after, answer
        everything accepted, then stop the model."""
        if not self.started.is_set():
            self.cancel.set()
            log.info("stopping during start-up (%s)", self.detail)
            await asyncio.to_thread(self.started.wait, startup_wait_s)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.close)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()

    async def run_controller(self) -> None:
        """The controller loop: every period, step the controller; query Prometheus (if
        configured) in a thread, never waiting on it. Starts once the engine is ready."""
        s = self.settings
        while not self.started.is_set():  # polled, not awaited in a thread that could outlive us
            await asyncio.sleep(0.05)
        engine = self.engine
        if engine is None:
            return
        source = PrometheusSource(s.prometheus_url) if s.prometheus_url else None
        querying: asyncio.Task | None = None
        next_query = 0.0
        while True:
            now = time.monotonic()
            try:
                engine.step_controller(now)
            except Exception:  # a bug here must not stop the loop (or the service) for good
                log.exception("controller step failed")
            if source is not None and now >= next_query and (querying is None or querying.done()):
                next_query = now + s.prometheus_period_s
                querying = asyncio.create_task(_query_fleet(engine.controller, source))
            await asyncio.sleep(s.controller_period_s)  # the period itself, not a wait for an event


async def _query_fleet(controller: Controller, source: PrometheusSource) -> None:
    try:
        controller.fleet = await asyncio.to_thread(source.fleet)
    except Exception as e:  # Prometheus down or slow: keep the last figures, show the error
        old = controller.fleet or Fleet()
        if old.error is None:
            log.warning("controller: %s", e)
        old.error = str(e)
        controller.fleet = old
