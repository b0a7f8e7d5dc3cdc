"""Prometheus metrics of the service: names prefixed ``snnet_``, base units, ``_total`` counters.

Each app instance owns its own ``CollectorRegistry`` (so tests can run several apps in one
process); ``/metrics`` exposes it, with the process collector for CPU and memory, the model
process's as ``snnet_model_process_*`` and the front processes' (``SNNET_API_WORKERS`` > 1) as
``snnet_front_process_*{front="0".."N-2"}``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

# Buckets from 1 ms to 30 s: tiny models on GPU through large ones on CPU under load.
LATENCY_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Why requests were shed (snnet_shed_total's reason). Load, which more replicas relieve:
# queue_full, overloaded. slow_now: nothing was queued, but the machine ran slower than when idle
# (CPU contention, a cold batch) and the budget sat at its floor; the alert on shedding and the
# HPA leave it out (the compose demo's 10 ms budgets fired the alert at load level 0).
SHED_REASONS = ("queue_full", "overloaded", "slow_now")


@dataclass
class Tally:
    """Refusals the log sums up rather than one line each (a server refusing half its traffic
    would flood it, and the access log is off by default): how many, why the last one, and when
    the log last said so (``server.engine.Engine.step_controller``)."""

    verb: str  # the log line's "shed", "refused"
    status: int
    count: int = 0
    last: str = ""
    logged_at: float = 0.0  # monotonic s; 0: never
    logged_count: int = 0

    def add(self, reason: str) -> None:
        self.count += 1
        self.last = reason

    def due(self, now: float, every_s: float, also: str = "") -> str | None:
        """The line to log now (``also`` before the last reason), if any came since the last
        line and that was ``every_s`` ago (the first at once); marks it logged."""
        new = self.count - self.logged_count
        if not new or (self.logged_at and now - self.logged_at < every_s):
            return None
        when = f"in the last {now - self.logged_at:.0f} s" if self.logged_at else "since start-up"
        self.logged_at, self.logged_count = now, self.count
        return (
            f"{self.verb} {new} request{'' if new == 1 else 's'} ({self.status}) {when}; "
            f"{also + '; ' if also else ''}the last: {self.last}"
        )


class FrontsCollector:
    """CPU and memory of the front processes (``server.fronts``), one series per front slot:
    ``snnet_front_process_*{front="i"}``, prometheus-client's process metrics of the process
    now in slot ``i`` (a front restarted after a crash keeps its slot; its counters start
    again, which ``rate`` reads as a reset). Nothing while there are no fronts.

    Args:
        pids: The fronts' pids by slot, now (``None``: that slot has no process).
    """

    def __init__(self, pids: Callable[[], list[int | None]]) -> None:
        self.pids = pids
        self._now: list[int | None] = []
        self._slots: list[ProcessCollector] = []  # one per slot, made once (it reads boot time)

    def collect(self) -> Iterator:
        self._now = self.pids()
        while len(self._slots) < len(self._now):
            i = len(self._slots)
            self._slots.append(
                ProcessCollector(
                    namespace="snnet_front",
                    pid=lambda i=i: self._now[i] or "no-front-process",
                    registry=None,
                )
            )
        merged = {}  # family name -> a family with every slot's samples, labelled
        for slot, one in enumerate(self._slots[: len(self._now)]):
            for family in one.collect():  # nothing for a slot without a process
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = type(family)(
                        family.name, family.documentation, labels=["front"]
                    )
                for sample in family.samples:
                    out.samples.append(
                        sample._replace(labels={**sample.labels, "front": str(slot)})
                    )
        yield from merged.values()


class Metrics:
    """All metrics of one service instance."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=r)
        # The model process (SNNET_WORKER=process, the default on CPU) does most of the work:
        # its CPU and memory as snnet_model_process_*; nothing while there is none. The engine
        # sets model_pid once it has one (a process restarted after a crash: its new pid).
        self.model_pid: Callable[[], int | None] = lambda: None
        ProcessCollector(
            namespace="snnet_model", pid=lambda: self.model_pid() or "no-model-process", registry=r
        )
        # The front processes (SNNET_API_WORKERS > 1): they read, parse and decode requests
        # (a many-core host's CPU); the app sets front_pids when it starts them.
        self.front_pids: Callable[[], list[int | None]] = list
        r.register(FrontsCollector(lambda: self.front_pids()))
        PlatformCollector(registry=r)
        self.requests = Counter(
            "snnet_requests",
            "HTTP requests by route and status code",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "snnet_request_duration_seconds",
            "Time from request arrival to response, by route and status code (an answer's "
            'latency: status="200"; refusals take well under a millisecond)',
            ["route", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "snnet_queue_wait_seconds", "Time a classify request waited before its batch ran",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "snnet_compute_seconds", "Model time of one batch, by stitch", ["stitch"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_profiled_seconds = Counter(
            "snnet_compute_profiled_seconds",
            "The latency profile's (uncorrected) time for the batches run, by stitch; "
            "rate(snnet_compute_seconds_sum) / rate(this) is the observed slow-down",
            ["stitch"],
            registry=r,
        )
        self.model_cpu_wait_seconds = Counter(
            "snnet_model_cpu_wait_seconds",
            "Time the model's threads were ready to run a forward but waited for a CPU (other "
            "work on the machine; the mean of the threads that ran; Linux run delay, 0 "
            "elsewhere)",
            registry=r,
        )
        self.batch_size = Histogram(
            "snnet_batch_size", "Images per model batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.stitch_chosen = Counter(
            "snnet_stitch_chosen", "Requests answered by each stitch", ["stitch"], registry=r
        )
        self.gflops_served = Counter(
            "snnet_gflops_served",
            "GFLOPs of the stitches that answered, summed over images",
            registry=r,
        )
        self.budget_met = Counter(
            "snnet_budget_met", "Requests answered within their budget", registry=r
        )
        self.budget_missed = Counter(
            "snnet_budget_missed", "Requests answered after their budget ran out", registry=r
        )
        self.best_effort = Counter(
            "snnet_best_effort",
            "Requests answered with a budget below what the server promises (no stitch met it "
            "with the full safety margin; an idle server's fastest stitch did with the looser "
            "margin a refusal is judged on), by whether they met it; not in snnet_budget_met or "
            "snnet_budget_missed",
            ["outcome"],
            registry=r,
        )
        for outcome in ("met", "missed"):  # both series from the start, at 0
            self.best_effort.labels(outcome)
        self.shed = Counter(
            "snnet_shed", "Requests refused at once (503), by reason: queue_full (its image limit), overloaded (no stitch meets the budget behind the queue, or only by making queued requests miss theirs), slow_now (nothing queued, but the machine slower than when idle just now: a budget at its floor)",
            ["reason"], registry=r,
        )  # fmt: skip
        for reason in SHED_REASONS:  # (every series from the start: rate() needs two samples)
            self.shed.labels(reason)
        # For the log (server.engine.Engine.step_controller): requests shed (503), and those the
        # planner refused as asking what this server cannot give (422: a budget below what it
        # needs idle, a stitch it does not have, ...), which say what clients expect of it.
        self.shed_tally, self.refused_tally = Tally("shed", 503), Tally("refused", 422)
        self.queue_depth = Gauge("snnet_queue_depth", "Images waiting for the model", registry=r)
        self.withdrawn = Counter(
            "snnet_withdrawn_images",
            "Images taken out of the queue unrun because their client went away while they "
            "waited (a gRPC call cancelled or past its deadline, an HTTP connection closed)",
            registry=r,
        )
        self.queue_predicted_wait = Gauge(
            "snnet_queue_predicted_wait_seconds", "Predicted wait of a new request behind the current queue",
            registry=r,
        )  # fmt: skip
        self.latency_correction = Gauge(
            "snnet_latency_correction",
            "Observed / profiled compute time, by stitch",
            ["stitch"],
            registry=r,
        )
        self.arrivals = Counter(
            "snnet_arrivals", "Classify requests received (counted on arrival)", registry=r
        )
        self.front_tensors = Counter(
            "snnet_front_tensors",
            "Requests' image tensors received from front processes (SNNET_API_WORKERS > 1), by "
            "how they crossed: shared_memory, or socket (a front without an arena, or its arena "
            "full)",
            ["via"],
            registry=r,
        )
        self.http_backlog = Gauge(
            "snnet_http_backlog",
            "Classify requests being read, parsed or decoded (not yet queued for the model), in "
            "every API worker from its plan on; set by the controller loop",
            registry=r,
        )
        self.images = Counter(
            "snnet_images",
            "Images in classify requests as they arrived (before they were decoded or planned)",
            registry=r,
        )
        self.request_budget_seconds = Histogram(
            "snnet_request_budget_seconds", "Latency budget of classify requests that had one",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Controller state (server/controller.py).
        self.load_level = Gauge(
            "snnet_load_level",
            "Controller load level: 0 = requests without a budget may use the most accurate "
            "stitch, 1 = only the cheapest",
            registry=r,
        )
        self.arrival_rate = Gauge(
            "snnet_arrival_rate", "Classify requests arriving per second (controller estimate)",
            registry=r,
        )  # fmt: skip
        self.controller_updates = Counter(
            "snnet_controller_updates", "Controller iterations", registry=r
        )
        self.ready = Gauge(
            "snnet_ready", "1 when the model is loaded, verified and profiled", registry=r
        )
        self.slo_target = Gauge(
            "snnet_slo_target",
            "The share of answered requests this server promises within their budget "
            "(SNNET_SLO_TARGET); snnet_budget_met / (met + missed + shed) is held against it",
            registry=r,
        )
        self.model = Info("snnet_model", "The served SN-Net", registry=r)

    def count_refused(self, reason: str) -> None:
        """One request the planner refused (422), and why: for the log (the requests counter
        has it by status)."""
        self.refused_tally.add(reason)

    def count_shed(self, detail: str, reason: str = "overloaded") -> None:
        """One request shed (503), its ``detail`` for the log and its ``reason`` (SHED_REASONS)
        for ``snnet_shed_total``."""
        self.shed.labels(reason).inc()
        self.shed_tally.add(detail)
