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
import contextlib
import gc
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import snnet_core
from snnet_core import (
    DeviceFingerprint,
    ImageTransform,
    LatencyProfile,
    Manifest,
    SNNet,
    StitchMenu,
    resolve_device,
    resolve_dtype,
)

from . import early
from .config import Settings
from .controller import Controller, Fleet, PrometheusSource, read_metrics
from .cpuwait import contended
from .environ import cores
from .imaging import decode_cost_points, make_transform
from .ingress import Ingress
from .latency import LatencyModel
from .metrics import Metrics
from .planner import Plan, Planner
from .profiling import (
    ServedTimer,
    calibrate,
    choose_dtype,
    choose_profile,
    choose_threads,
    front_end_ms,
)
from .runner import InlineRunner, ProcessRunner, RunnerError, settle_early, warmed
from .scheduler import COLD_PROBES, Result, Scheduler

log = logging.getLogger("snnet.engine")


class StartupCancelled(Exception):
    """Start-up was asked to stop (SIGTERM or Ctrl-C before the engine was built)."""


SWITCH_INTERVAL_S = 0.0002
# Requests shed (503) or refused by the planner (422) are said in the log at most this often
# (with how many and the last reason): the access log is off by default, and a server shedding
# half its traffic said nothing.
TALLY_LOG_S = 10.0


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
    transform: ImageTransform  # PIL image(s) -> float32 tensors, as the manifest says
    profile: LatencyProfile  # every stitch at every batch size, measured or estimated
    profile_source: str  # "manifest", "cache <path>" or "measured ...", and the calibration
    estimated: frozenset[int]  # stitches whose profiled times are estimated from GFLOPs
    latency: LatencyModel
    runner: InlineRunner | ProcessRunner
    scheduler: Scheduler
    controller: Controller
    ingress: Ingress
    planner: Planner

    @property
    def model_name(self) -> str:
        """The model's name in /stitches and the Open Inference Protocol: SNNET_MODEL_NAME, else
        the checkpoint directory's name."""
        return self.settings.model_name or self.settings.weights.resolve().name

    def record_answer(
        self, plan: Plan, result: Result, images: int, payload_bytes: int, total_ms: float
    ) -> bool:
        """Fold one answered request into the metrics, the HTTP-cost estimate and the safety
        margin; whether it met its budget."""
        http = total_ms - result.queue_ms - result.compute_ms
        # Served alone: planned with nothing else in the server, and nothing arrived since.
        alone = plan.alone_at is not None and plan.alone_at == self.ingress.arrivals
        # Alone in the server, not on the machine: the model's threads waited for a CPU in its
        # forward (a co-tenant's work; ``server.cpuwait``). Its times are then load, not what an
        # idle server takes.
        busy_machine = alone and contended(result.wait_ms, result.compute_ms)
        self.ingress.observe(
            payload_bytes,
            http - plan.spent_ms - plan.ingress_ms,
            http,
            # (a contended answer still counts here: these are medians of the last 64; kept
            # out, the page's burst test got 60 422s in a CI run where the browser had made the
            # page's own earlier answers contended: with fewer than REST_MIN, the idle need
            # then came from the burst's HTTP times, since session 35 start-up's figures)
            alone=alone,
            # what admission counts before its own work: read, parsed, and the loop's lag then
            spent_ms=plan.spent_ms + plan.ingress_ms,
        )
        # The margin covers what the planner cannot plan: HTTP work and compute running over the
        # prediction. Not the queue wait: under earliest-deadline-first a request may wait longer
        # than predicted by design, for one due sooner, within its deadline (admission checks it).
        self.controller.observe_residual(
            total_ms - plan.spent_ms - result.queue_ms,
            plan.outside_queue_ms,
            alone=alone,
            contended=busy_machine,
        )
        met = total_ms + self.settings.network_ms <= plan.budget_ms
        m = self.metrics
        m.stitch_chosen.labels(str(plan.stitch)).inc()
        m.gflops_served.inc(self.menu.rows[plan.stitch].gflops * images)
        if plan.best_effort:  # below the promise: not in the attainment the SLO is about
            m.best_effort.labels("met" if met else "missed").inc()
        else:
            (m.budget_met if met else m.budget_missed).inc()
        return met

    def record_unanswered(self, plan: Plan) -> None:
        """An admitted request whose client went away after its budget ran out (a gRPC call's
        deadline passed while it waited): a miss, like an answer that came too late."""
        if plan.best_effort:
            self.metrics.best_effort.labels("missed").inc()
        else:
            self.metrics.budget_missed.inc()

    def step_controller(self, now: float) -> None:
        """One controller iteration: read the metrics, update, publish the state."""
        c, m = self.controller, self.metrics
        # The queue term looks at work waiting, not at the batch in flight: one request being
        # served is not load, and counting it made the level flicker on a nearly idle server.
        c.update(read_metrics(m, self.scheduler.queued_work_ms()))
        m.queue_predicted_wait.set(self.scheduler.predicted_wait_ms(now) / 1e3)
        m.http_backlog.set(self.ingress.unqueued)
        m.load_level.set(c.level)
        m.arrival_rate.set(c.arrival_rate)
        m.controller_updates.inc()
        for stitch, value in c.latency.corrections().items():
            m.latency_correction.labels(str(stitch)).set(value)
        if said := m.shed_tally.due(now, TALLY_LOG_S, f"load level {c.level:.2f}"):
            log.warning(said)
        if said := m.refused_tally.due(now, TALLY_LOG_S):
            log.info(said)

    def close(self) -> None:
        """Answer everything accepted, then stop the model."""
        log.info("draining %d queued images", self.scheduler.queued_images)
        self.scheduler.stop()
        self.runner.close()


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
    dtype = None if s.dtype == "auto" else resolve_dtype(s.dtype, device)
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
    stage("loading checkpoint")
    net, manifest = snnet_core.load(s.weights)
    menu = StitchMenu.of(manifest.stitches)
    if worker == "process":
        # A model process started before this one's imports (server.early) may still be
        # importing: what is measured next must not share the cores with it.
        stage("waiting for the model process's imports")
        settle_early(cancel)
    threads = None  # on CUDA: torch's default for the few CPU ops
    if device.type == "cpu":  # dtype is measured with a core left to the event loop
        torch.set_num_threads(max(1, cores() - 1))
    if dtype is None:
        stage("choosing the dtype")
        name, figures = choose_dtype(net, menu, manifest, device)
        dtype = snnet_core.DTYPES[name]
        log.info("dtype: %s (SNNET_DTYPE=auto; %s)", name, figures)
    net = net.to(device, dtype).eval()
    transform = make_transform(manifest.preprocessing)
    if device.type == "cpu":
        stage("choosing threads")
        if s.threads == "auto":
            front_ms = 0.0
            if cores() > 1:  # decoded as requests will be: on one thread beside a model process
                torch.set_num_threads(1 if worker == "process" else cores() - 1)
                front_ms = front_end_ms(transform, tuple(net.input_size))
            threads, figures = choose_threads(net, menu, front_ms)
            log.info("threads: %d (SNNET_THREADS=auto; %s)", threads, figures)
            # The next start's model process is spawned before this choice is made, with
            # OpenMP settings that depend on it (``server.early``): it starts from this one.
            early.remember_threads(s.weights, threads, s.profile_cache)
        else:
            threads = s.threads
        torch.set_num_threads(threads)
    dtype_name = str(dtype).removeprefix("torch.")
    log.info(
        "loaded %s: %s, %d stitches, on %s %s (%.1fs)", s.weights, ",".join(net.anchor_names),
        len(menu), device, dtype_name, time.perf_counter() - t0,
    )  # fmt: skip
    # The model's fingerprint (its threads) before this process gives its own threads up.
    fp = DeviceFingerprint.current(device, dtype)
    # Warm up where the model will run, at the smallest and the largest batch it will see.
    warm = sorted({1, s.max_batch_size})
    if worker == "process":
        stage("starting the model process and warming up")
        try:
            runner = ProcessRunner(
                net, dtype, threads, warm, cancelled=cancel, max_batch=s.max_batch_size
            )
        except RunnerError:
            check()  # cancelled: say so, not "failed"
            raise
        metrics.model_pid = lambda: runner.pid  # its CPU and memory in /metrics
    else:
        early.discard()  # spawned for a CPU model, but this one runs in a thread
        stage("warming up")
        runner = InlineRunner(net, device, dtype, s.max_batch_size)
        runner.warm_up(warm, check)
    scheduler = None
    try:
        check()
        if runner.kind == "process":
            # The model has its own process and threads; this one decodes one image at a
            # time, and an OpenMP team here would only contend with the model's for the cores.
            torch.set_num_threads(1)
        stage("latency profile")
        # Measured where requests run: through the runner.
        timer = ServedTimer(
            runner, tuple(net.input_size), s.profile_repeats, check, warmed(net, warm)
        )
        start = choose_profile(s, manifest, menu, fp, timer, check)
        profile, source = start.profile, start.source
        points = decode_cost_points(transform)
        ingress.seed(points)
        log.info(
            "decoding and preprocessing here: %s",
            ", ".join(f"{b} bytes {ms:.2f} ms" for b, ms in points),
        )
        stage("calibrating the latency profile")
        serving, calibration, factors = calibrate(
            net, runner, profile, warm, check, start.estimated, runner.first_ms, timed=timer.runs
        )
        if factors:
            log.info(
                "%d estimated stitches scaled by their warm-up run at batch %d: x%.2f..x%.2f "
                "(median x%.2f)", len(factors), min(warm), min(factors), max(factors),
                statistics.median(factors),
            )  # fmt: skip
            source += f", {len(factors)} estimates checked by a warm-up run"
        source = f"{source}; {calibration}"
        latency = LatencyModel(serving)
        scheduler = Scheduler(
            latency, runner, stitches=len(menu), max_batch=s.max_batch_size,
            max_wait_ms=s.max_batch_wait_ms, max_queue=s.max_queue, metrics=metrics,
        )  # fmt: skip
        controller = Controller(
            latency, menu.ranking, max_batch=s.max_batch_size, scores=menu.scores,
            target_utilisation=s.target_utilisation, estimated=start.estimated,
            slo_target=s.slo_target,
        )  # fmt: skip
        planner = Planner(
            menu, scheduler, controller, ingress, default_budget_ms=s.default_budget_ms,
            network_ms=s.network_ms, baseline_policies=s.baseline_policies,
        )  # fmt: skip
        stage("timing batches after a pause")
        check()
        cheapest = min(range(len(menu)), key=lambda i: latency.predict_ms(i, 1))
        cold = scheduler.probe_cold(cheapest, tuple(net.input_size))
        log.info(
            "after a pause, a batch took %.2f ms %s its predicted time (stitch %d, median of "
            "%d); the planner allows for %s in the first request after a pause",
            abs(cold), "over" if cold >= 0 else "under", cheapest, COLD_PROBES,
            "that" if cold > 0 else "nothing more",
        )  # fmt: skip
        scheduler.start()
        metrics.model.info(
            {
                "anchors": ",".join(net.anchor_names), "family": net.family, "stitches": str(len(menu)),
                "device": str(device), "dtype": dtype_name, "weights_sha256": manifest.weights_sha256[:16],
                # how the profile was had: manifest, cache or measured (a label that stays the
                # same from one start to the next; the whole story is /stitches' "profile")
                "profile": source.split(" ", 1)[0], "worker": runner.kind,
            }
        )  # fmt: skip
        for i in range(len(menu)):
            metrics.latency_correction.labels(str(i)).set(1.0)
    except BaseException:  # the model process must not outlive a failed start-up
        if scheduler is not None:
            scheduler.stop(5)
        runner.close()
        raise
    log.info("engine built in %.1fs (profile: %s)", time.perf_counter() - t0, source)
    return Engine(
        settings=s, metrics=metrics, net=net, manifest=manifest, menu=menu, device=device,
        dtype=dtype, transform=transform, profile=profile, estimated=start.estimated,
        profile_source=source, latency=latency, runner=runner, scheduler=scheduler,
        controller=controller, ingress=ingress, planner=planner,
    )  # fmt: skip


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
        ingress.serving = False  # until start() has built the engine
        self.engine: Engine | None = None
        self.detail = "loading"
        self.failed: str | None = None  # what start-up failed with
        # Called (from start-up's thread) once start-up failed: `snnet serve` stops the server
        # then. (It kept running, /healthz green and /readyz 503 for ever: a liveness probe
        # never restarted it, and only a 20-minute start-up probe could.)
        self.on_failure: Callable[[], None] | None = None
        self.started = threading.Event()  # set when start() finished, well or not
        self.cancel = threading.Event()  # set to stop start-up early
        self._started_async: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def _status(self, detail: str) -> None:
        self.detail = detail

    def start(self) -> None:
        """Build the engine (blocking: run it in a thread); a failure is logged, kept in
        ``detail`` for /readyz and ``failed``, and ``on_failure`` called."""
        t0 = time.perf_counter()
        # uvicorn has just said "running": say that requests wait for the ready line (worded
        # so as not to contain it: people, tests and benchmarks wait for "ready in")
        log.info("starting: loading the model and timing it on this machine; requests get 503 "
                 "until it logs that it is ready (GET /readyz says 200 then)")  # fmt: skip
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
            self.ingress.loop_lag_ms, self.ingress.serving = 0.0, True
            self.metrics.ready.set(1)
            # Only now: whoever waits for this line (people, tests, benchmarks) may send at once.
            log.info(
                "ready in %.1fs (profile: %s)", time.perf_counter() - t0, engine.profile_source
            )
        except StartupCancelled:
            self.detail = "start-up cancelled"
            log.info("start-up cancelled")
        except Exception as e:
            lines = str(e).splitlines() or [""]  # (a page of size mismatches: the log has it)
            self.failed = f"{type(e).__name__}: {lines[0]}{' ...' if len(lines) > 1 else ''}"
            self.detail = f"start-up failed: {self.failed}"
            log.exception("start-up failed")
        finally:
            early.discard()  # a model process started early that nothing took: not needed
            self.started.set()
            if self._started_async is not None:
                loop, event = self._started_async
                with contextlib.suppress(RuntimeError):  # the loop is already closed
                    loop.call_soon_threadsafe(event.set)
            if self.failed and self.on_failure is not None:
                self.on_failure()

    def start_in_background(self) -> threading.Thread:
        """``start`` in a daemon thread: a process told to stop during start-up need not wait
        for it (see ``shutdown``). Call from the event loop: ``run_controller`` awaits it."""
        self._started_async = (asyncio.get_running_loop(), asyncio.Event())
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
        await asyncio.to_thread(self.stop)

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()

    async def run_controller(self) -> None:
        """The controller loop: every period, step the controller; query Prometheus (if
        configured) in a thread, never waiting on it. Starts once the engine is ready."""
        s = self.settings
        if self._started_async is not None:
            await self._started_async[1].wait()
        engine = self.engine
        if engine is None:
            return
        source = (
            PrometheusSource(s.prometheus_url, selector=s.prometheus_selector)
            if s.prometheus_url
            else None
        )
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
