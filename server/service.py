"""The model service: load and verify the checkpoint, place it, profile it, run the scheduler.

Start-up runs in a worker thread while the HTTP server already answers ``/healthz``;
``/readyz`` turns 200 only after every step below is done:

1. load + verify the checkpoint (schema, sha256), move it to the device and dtype;
2. find a latency profile for this device fingerprint covering every stitch and the batch
   sizes the batcher forms: in the manifest, else in the profile cache, else measure it now
   (progress in the log) and keep it in the cache;
3. start the runner (``SNNET_WORKER``: on CPU a child process that maps the weights from shared
   memory, see ``server.runner``) and warm up every stitch where it will run;
4. build the latency model and start the scheduler and its controller.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

import snnet_core
from snnet_core import DeviceFingerprint, LatencyProfile, Manifest, SNNet, pareto_front

from .config import Settings
from .controller import Controller, Fleet, PrometheusSource, read_metrics
from .imaging import make_transform
from .latency import LatencyModel
from .metrics import Metrics
from .runner import InlineRunner, ProcessRunner
from .scheduler import Scheduler

log = logging.getLogger("snnet.service")

SWITCH_INTERVAL_S = 0.0002
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; a clear error for cuda without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"SNNET_DEVICE={name} but CUDA is not available here; use cpu or auto")
    return device


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


class ModelService:
    """Everything the routes need: the net, its manifest, the scheduler, readiness."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.ready = False
        self.detail = "loading"
        self.started = threading.Event()  # set when start() finished, well or not
        self.net: SNNet | None = None
        self.manifest: Manifest | None = None
        self.scheduler: Scheduler | None = None
        self.latency: LatencyModel | None = None
        self.controller: Controller | None = None
        self.profile: LatencyProfile | None = None
        self.runner: InlineRunner | ProcessRunner | None = None
        self.device = resolve_device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ValueError(f"SNNET_DTYPE=float16 needs CUDA but the device is {self.device}")
        self.worker = settings.worker
        if self.worker == "auto":
            self.worker = "process" if self.device.type == "cpu" else "thread"
        if self.worker == "process" and self.device.type != "cpu":
            raise ValueError(
                f"SNNET_WORKER=process runs CPU models only but the device is {self.device}; "
                "use SNNET_WORKER=thread (or auto)"
            )
        self.ranking: list[int] = []
        self.pareto: set[int] = set()
        self.profile_source = ""
        # HTTP-side cost of one request (parsing, decoding, answering: its time minus queue wait
        # and compute), and the requests inside /classify that have not reached the model queue
        # yet. Under load the event loop works through those before it gets back to a new one,
        # so a choice adds their HTTP cost to its prediction. (Requests already queued for the
        # model are not counted: their parsing is done, and counting them made a backlog look
        # like an HTTP jam and shed requests the model could still serve.) Event-loop state:
        # read and written on the loop thread only.
        self.http_ms = 1.0
        self.in_flight = 0
        self.loop_lag_ms = 0.0

    def observe_http(self, total_ms: float, queue_ms: float, compute_ms: float) -> None:
        self.http_ms = 0.9 * self.http_ms + 0.1 * max(0.0, total_ms - queue_ms - compute_ms)

    def ingress_wait_ms(self) -> float:
        """Predicted HTTP-layer wait of a new request: behind the others still being parsed, plus
        how late the event loop runs ready work now (requests not yet in the handler show up
        only there)."""
        return max(0, self.in_flight - 1) * self.http_ms + self.loop_lag_ms

    async def watch_loop_lag(self, period_s: float = 0.005) -> None:
        """Track how late the event loop wakes a sleeper: an EWMA of the oversleep, in ms."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(period_s)  # the instrument: how late this timer fires is the lag
            late = max(0.0, (loop.time() - t - period_s) * 1e3)
            self.loop_lag_ms = 0.8 * self.loop_lag_ms + 0.2 * late

    # -- start-up -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
            # Move everything start-up made (the model, timm, torch, FastAPI: ~400k objects) out
            # of the collector's reach: a full collection over them took ~200 ms here, and one
            # under load stalled every request in flight past its budget.
            gc.collect()
            gc.freeze()
            self.ready, self.detail = True, "ready"
            self.metrics.ready.set(1)
        except Exception as e:
            self.detail = f"start-up failed: {e}"
            log.exception("start-up failed")
        finally:
            self.started.set()

    def _start(self) -> None:
        s = self.settings
        # With SNNET_WORKER=thread the worker needs the GIL back after every torch op; while the
        # event loop parses requests it would wait up to Python's switch interval (5 ms) each
        # time, and a forward of a few hundred ops became 10x slower than profiled under a
        # burst. Hand over sooner. (The process worker avoids the wait altogether.)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        threads = s.threads or default_threads(self.device)
        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.detail = "loading checkpoint"
        net, manifest = snnet_core.load(s.weights)
        net = net.to(self.device, self.dtype).eval()
        self.net, self.manifest = net, manifest
        self.transform = make_transform(manifest.preprocessing)
        log.info(
            "loaded %s: %s, %d stitches, on %s %s (%.1fs)", s.weights, ",".join(net.anchor_names),
            len(net.stitches), self.device, s.dtype, time.perf_counter() - t0,
        )  # fmt: skip
        self.detail = "latency profile"
        self.profile = self._profile()
        self.latency = LatencyModel(self.profile)
        self._rank()
        # Warm up where the model will run, at the smallest and the largest batch it will see.
        warm = sorted({1, s.max_batch_size})
        if self.worker == "process":
            self.detail = "starting the model process and warming up"
            self.runner = ProcessRunner(net, self.dtype, threads, warm)
        else:
            self.detail = "warming up"
            self.runner = InlineRunner(net, self.device, self.dtype)
            self.runner.warm_up(warm)
        self.scheduler = Scheduler(
            net, self.latency, self.ranking, device=self.device, dtype=self.dtype,
            max_batch=s.max_batch_size, max_wait_ms=s.max_batch_wait_ms, max_queue=s.max_queue,
            metrics=self.metrics, order_budget_ms=s.default_budget_ms, runner=self.runner,
        )  # fmt: skip
        self.controller = Controller(
            self.latency, self.ranking, max_batch=s.max_batch_size, scores=self.scores,
            target_utilisation=s.target_utilisation,
        )  # fmt: skip
        self.scheduler.start()
        self.metrics.model.info(
            {
                "anchors": ",".join(net.anchor_names), "family": net.family, "stitches": str(len(net.stitches)),
                "device": str(self.device), "dtype": s.dtype, "weights_sha256": manifest.weights_sha256[:16],
                "profile": self.profile_source, "worker": self.runner.kind,
            }
        )  # fmt: skip
        for i in range(len(net.stitches)):
            self.metrics.latency_correction.labels(str(i)).set(1.0)
        log.info("ready in %.1fs (profile: %s)", time.perf_counter() - t0, self.profile_source)

    def _profile(self) -> LatencyProfile:
        s, net, manifest = self.settings, self.net, self.manifest
        fp = DeviceFingerprint.current(self.device, self.dtype)
        sizes = s.batch_sizes()
        found = manifest.profile_for(fp)
        if found and _covers(found, len(net.stitches), sizes):
            self.profile_source = "manifest"
            return found
        cache = default_cache_path(s, manifest.weights_sha256)
        cached = self._read_cache(cache, manifest.weights_sha256)
        for p in cached:
            if p.fingerprint == fp and _covers(p, len(net.stitches), sizes):
                self.profile_source = f"cache {cache}"
                return p
        log.info(
            "no latency profile for this device (%s, %s, %d threads): measuring %d stitches x batch "
            "sizes %s", fp.device_name, fp.dtype, fp.threads, len(net.stitches), sizes,
        )  # fmt: skip
        profile = snnet_core.measure_latency(
            net,
            None,
            sizes,
            warmup=1,
            repeats=s.profile_repeats,
            progress=False,
            on_progress=self._log_progress,
        )
        cached = [p for p in cached if p.fingerprint != fp] + [profile]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "weights_sha256": manifest.weights_sha256,
                        "profiles": [p.to_dict() for p in cached],
                    },
                    indent=1,
                )
            )
            os.replace(tmp, cache)
            self.profile_source = f"measured, kept in {cache}"
        except OSError as e:
            log.warning("could not write the profile cache %s: %s", cache, e)
            self.profile_source = "measured (not cached)"
        return profile

    @staticmethod
    def _log_progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log.info("profiling: %d/%d measurements", done, total)

    @staticmethod
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

    def _rank(self) -> None:
        """Most accurate first (GFLOPs stands in where the checkpoint has no accuracy)."""
        rows = self.manifest.stitches
        acc = self.manifest.accuracy()
        if acc:
            score = {r["id"]: acc.get(r["id"], float("-inf")) for r in rows}
        else:
            score = {r["id"]: r["gflops"] for r in rows}
        self.ranking = sorted(score, key=lambda i: (-score[i], rows[i]["gflops"]))
        self.scores = score
        front = pareto_front([r["gflops"] for r in rows], [score[r["id"]] for r in rows])
        self.pareto = {rows[i]["id"] for i in front}

    # -- controller -----------------------------------------------------------------------------

    async def run_controller(self) -> None:
        """The controller loop: every period, read the metrics, step, publish its state. Starts
        once the model is ready; queries Prometheus (if configured) in a thread, never waiting
        on it."""
        s = self.settings
        await asyncio.to_thread(self.started.wait)
        if not self.ready:
            return
        source = PrometheusSource(s.prometheus_url) if s.prometheus_url else None
        querying: asyncio.Task | None = None
        next_query = 0.0
        while True:
            try:
                self.step_controller()
            except Exception:  # a bug here must not stop the loop (or the service) for good
                log.exception("controller step failed")
            now = time.monotonic()
            if source is not None and now >= next_query and (querying is None or querying.done()):
                next_query = now + s.prometheus_period_s
                querying = asyncio.create_task(self._query_fleet(source))
            await asyncio.sleep(s.controller_period_s)  # the period itself, not a wait for an event

    def step_controller(self) -> None:
        c, m = self.controller, self.metrics
        wait_ms = self.scheduler.predicted_wait_ms()
        # The queue term looks at work waiting, not at the batch in flight: one request being
        # served is not load, and counting it made the level flicker on a nearly idle server.
        c.update(read_metrics(m, self.scheduler.queued_work_ms()))
        m.queue_predicted_wait.set(wait_ms / 1e3)
        m.load_level.set(c.level)
        m.arrival_rate.set(c.arrival_rate)
        m.controller_updates.inc()
        for stitch, value in c.latency.corrections().items():
            m.latency_correction.labels(str(stitch)).set(value)

    async def _query_fleet(self, source: PrometheusSource) -> None:
        try:
            self.controller.fleet = await asyncio.to_thread(source.fleet)
        except Exception as e:  # Prometheus down or slow: keep the last figures, show the error
            old = self.controller.fleet or Fleet()
            if old.error is None:
                log.warning("controller: %s", e)
            old.error = str(e)
            self.controller.fleet = old

    def accuracy(self, stitch: int) -> float | None:
        return self.manifest.stitches[stitch].get("accuracy")

    def stop(self) -> None:
        if self.scheduler is not None:
            log.info("draining %d queued images", self.scheduler.queued_images)
            self.scheduler.stop()
        if self.runner is not None:
            self.runner.close()
