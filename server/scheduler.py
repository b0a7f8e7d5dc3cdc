"""Scheduler: picks the stitch for each request, queues it, batches, runs the model off the loop.

One worker thread feeds the model, which runs in that thread or in a child process
(``server.runner``); torch already spreads one forward over the CPU's cores, and a GPU runs one
stream at a time. Requests wait in one queue per stitch; the worker serves the
queue whose head has the earliest deadline, and holds a batch open for more requests of the same
stitch until it is full, ``max_batch_wait`` has passed, or the head's deadline would be at risk.

Every choice is made against a prediction of when the request would finish: the running batch's
remaining time, plus the queued work due before it (the worker serves earliest deadline first),
plus its own batch's compute, all from the latency model. A request is admitted only if it also
leaves every queued request due later within its deadline.
A request of more images than ``max_batch`` runs as consecutive batches of at most ``max_batch``,
as predicted. Requests without a budget are ordered as if their deadline were ``order_budget_ms``
away, so that under load they are not starved by requests with budgets.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from snnet_core import SNNet

from .latency import LatencyModel
from .metrics import Metrics
from .runner import InlineRunner

log = logging.getLogger("snnet.scheduler")


class ChoiceError(Exception):
    """A request the scheduler will not take; ``status`` and ``detail`` become the HTTP answer."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.retry_after_s = status, detail, retry_after_s


class ComputeError(RuntimeError):
    """The model failed on a batch; every request in it gets this."""


@dataclass
class Choice:
    stitch: int
    predicted_ms: float  # queue wait + compute, as predicted at choice time
    predicted_wait_ms: float


@dataclass
class Result:
    logits: torch.Tensor  # (n, classes) float32 on the CPU
    stitch: int
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass
class _Job:
    x: torch.Tensor  # (n, C, H, W) float32
    stitch: int
    deadline: float  # time.monotonic() seconds; ordering only for requests without a budget
    enqueued: float
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)

    @property
    def n(self) -> int:
        return self.x.shape[0]


def _resolve(fut: asyncio.Future, value: object, error: BaseException | None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class Scheduler:
    """Chooses stitches, queues and batches requests, and feeds the model from a worker thread.

    Args:
        net: The SN-Net, on ``device`` in ``dtype``, eval mode.
        latency: Predicted compute per (stitch, batch size).
        ranking: Stitch ids from most to least preferred (most accurate first).
        max_batch: Largest batch formed from several requests.
        max_wait_ms: Longest a batch is held open for more requests.
        max_queue: Images allowed to wait in all queues together.
        metrics: Where queue depth, batch sizes and compute times go.
        order_budget_ms: Deadline used to order requests that have no budget.
        runner: Runs one batch (``runner(x, stitch) -> logits``); default: ``net`` in the
            worker thread. See ``server.runner`` for the child-process runner.
    """

    def __init__(
        self,
        net: SNNet,
        latency: LatencyModel,
        ranking: Sequence[int],
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics | None = None,
        order_budget_ms: float = 1000.0,
        runner: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, got "
                f"{max_batch}, {max_queue}, {max_wait_ms}"
            )
        self.net, self.latency, self.ranking = net, latency, list(ranking)
        self.device, self.dtype = device, dtype
        self.runner = runner if runner is not None else InlineRunner(net, device, dtype)
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self.metrics = metrics
        self.order_budget_s = order_budget_ms / 1e3
        self._cv = threading.Condition()
        self._queues: dict[int, deque[_Job]] = {s: deque() for s in range(len(net.stitches))}
        self._queued = 0  # images waiting
        self._running_until = 0.0  # predicted monotonic end of the batch being computed
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- prediction ---------------------------------------------------------------------------

    def _batches_ms(self, stitch: int, images: int) -> float:
        """Predicted compute of ``images`` images of one stitch, in batches of ``max_batch``."""
        full, rest = divmod(images, self.max_batch)
        ms = full * self.latency.predict_ms(stitch, self.max_batch)
        return ms + (self.latency.predict_ms(stitch, rest) if rest else 0.0)

    def _plan_locked(self, deadline: float, now: float) -> tuple[float, dict[int, int], float]:
        """The queue in deadline order, as seen by a new job due at ``deadline``.

        Returns the ms of work predicted to run before it (the batch in flight and every queued
        job due no later, in per-stitch batches), the images of each stitch among those jobs (a
        job of the same stitch joins their batches), and the least slack (ms) among the jobs due
        later that are predicted to make it: a new job may delay them by at most that.
        """
        jobs = sorted(
            (j for q in self._queues.values() for j in q), key=lambda j: (j.deadline, j.enqueued)
        )
        total = max(0.0, self._running_until - now) * 1e3
        counts: dict[int, int] = {}
        ahead: tuple[float, dict[int, int]] | None = None
        later_slack = math.inf
        for j in jobs:
            if ahead is None and j.deadline > deadline:
                ahead = (total, dict(counts))
            c = counts.get(j.stitch, 0)
            total += self._batches_ms(j.stitch, c + j.n) - self._batches_ms(j.stitch, c)
            counts[j.stitch] = c + j.n
            if ahead is not None:
                slack = (j.deadline - now) * 1e3 - total
                if slack >= 0:  # one already late is not protected: it cannot be saved
                    later_slack = min(later_slack, slack)
        if ahead is None:
            ahead = (total, counts)
        return ahead[0], ahead[1], later_slack

    def predicted_wait_ms(self) -> float:
        """Predicted wait of a new request behind everything queued and running now."""
        with self._cv:
            wait = max(0.0, self._running_until - time.monotonic()) * 1e3
            return wait + sum(
                self._batches_ms(s, sum(j.n for j in q)) for s, q in self._queues.items() if q
            )

    def queued_work_ms(self) -> float:
        """Predicted compute of everything waiting (not the batch running now)."""
        with self._cv:
            return sum(
                self._batches_ms(s, sum(j.n for j in q)) for s, q in self._queues.items() if q
            )

    def idle_ms(self, stitch: int, n: int = 1) -> float:
        return self._batches_ms(stitch, n)

    # -- choice -------------------------------------------------------------------------------

    def choose(
        self,
        budget_ms: float,
        n: int = 1,
        candidates: Sequence[int] | None = None,
        extra_wait_ms: float = 0.0,
        static: bool = False,
        protect_ms: float = 0.0,
        network_ms: float = 0.0,
    ) -> Choice:
        """The most preferred stitch whose predicted wait + compute fits ``budget_ms``, without
        making a queued job miss its deadline.

        The worker serves jobs earliest deadline first, so the wait counts only the work due no
        later than this request; in exchange, the request's own compute must fit in the slack
        of every job due later (less ``protect_ms``, the controller's safety margin, which they
        were admitted with). ``extra_wait_ms`` is time the request will spend outside the model
        queue (the HTTP layer's own backlog under load, and the safety margin), added to every
        prediction. ``static`` ignores the load: the most preferred stitch whose compute on an
        idle server fits (the baseline without load feedback; it never sheds). ``network_ms`` of
        the budget is reserved for time outside the server (``SNNET_NETWORK_MS``).

        Raises:
            ChoiceError: 422 if no stitch fits even on an idle server; 503 (with Retry-After)
                if one would, but not behind the current queue (load shedding).
        """
        ranking = (
            self.ranking
            if candidates is None
            else [s for s in self.ranking if s in set(candidates)]
        )
        fastest = min(ranking, key=lambda s: self.idle_ms(s, n))
        fastest_ms = self.idle_ms(fastest, n)
        if budget_ms - network_ms < fastest_ms:
            reserved = (
                f" plus the {network_ms:g} ms reserved for the network (SNNET_NETWORK_MS)"
                if network_ms
                else ""
            )
            least = math.ceil((fastest_ms + network_ms) * 100) / 100
            raise ChoiceError(
                422,
                f"latency_budget_ms={budget_ms:g} is below the fastest stitch's compute time "
                f"({fastest_ms:.2f} ms for stitch {fastest} at batch {n}){reserved} even on an "
                f"idle server; allowed: latency_budget_ms >= {least:.2f}",
            )
        full_budget_ms, budget_ms = budget_ms, budget_ms - network_ms
        if static:
            s = next(s for s in ranking if self.idle_ms(s, n) <= budget_ms)
            return Choice(s, self.idle_ms(s, n), 0.0)
        now = time.monotonic()
        with self._cv:
            ahead_ms, counts, later_slack = self._plan_locked(now + budget_ms / 1e3, now)
            wait_ms, fits = 0.0, False
            for s in ranking:
                c = counts.get(s, 0)
                before = self._batches_ms(s, c)
                compute_ms = self._batches_ms(s, c + n)
                wait_ms = ahead_ms - before + extra_wait_ms
                if wait_ms + compute_ms > budget_ms:
                    continue
                fits = True
                # It must not push a job due later past its deadline either.
                if compute_ms - before <= later_slack - protect_ms:
                    return Choice(s, wait_ms + compute_ms, wait_ms)
        if self.metrics:
            self.metrics.shed.inc()
        retry = max(1, math.ceil(wait_ms / 1e3))
        if fits:
            detail = (
                f"overloaded: a stitch could answer within latency_budget_ms={full_budget_ms:g}, but "
                "only by making queued requests miss their deadlines; retry later"
            )
        else:
            detail = (
                f"overloaded: no stitch can answer within latency_budget_ms={full_budget_ms:g} behind "
                f"the current queue (predicted wait {wait_ms:.0f} ms); retry later or allow a "
                "larger budget"
            )
        raise ChoiceError(503, detail, retry_after_s=retry)

    # -- queueing -----------------------------------------------------------------------------

    def submit(self, x: torch.Tensor, stitch: int, budget_ms: float | None) -> asyncio.Future:
        """Queue ``x`` (n, C, H, W) for ``stitch``; the returned future resolves to a Result.

        Must be called from the event loop's thread.

        Raises:
            ChoiceError: 503 when the queue is full or the server is shutting down.
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + (budget_ms / 1e3 if budget_ms is not None else self.order_budget_s)
        job = _Job(x, stitch, deadline, now, loop.create_future(), loop)
        with self._cv:
            if self._stopping:
                raise ChoiceError(503, "the server is shutting down; retry on another replica", 1)
            if self._queued + job.n > self.max_queue:
                if self.metrics:
                    self.metrics.shed.inc()
                raise ChoiceError(
                    503,
                    f"queue full: {self._queued} images waiting, limit {self.max_queue}; retry later",
                    retry_after_s=1,
                )
            # Each queue in deadline order: batches take the most urgent jobs of their stitch.
            bisect.insort(self._queues[stitch], job, key=lambda j: (j.deadline, j.enqueued))
            self._queued += job.n
            self._update_gauges_locked()
            self._cv.notify_all()
        return job.future

    def _update_gauges_locked(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self._queued)

    # -- worker -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._run, name="snnet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish everything queued, then stop the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued_images(self) -> int:
        return self._queued

    def _next_batch_locked(self) -> list[_Job] | None:
        """Wait for work, pick the queue with the earliest deadline, form its batch."""
        while True:
            heads = [q[0] for q in self._queues.values() if q]
            if heads:
                break
            if self._stopping:
                return None
            self._cv.wait()
        head = min(heads, key=lambda j: (j.deadline, j.enqueued))
        q = self._queues[head.stitch]
        # Hold the batch open for more requests of this stitch, but never past the point where
        # the head would miss its deadline, and not at all when shutting down.
        hold_until = head.enqueued + self.max_wait_s
        slack = head.deadline - self.latency.predict_ms(head.stitch, self.max_batch) / 1e3
        hold_until = min(hold_until, slack)
        while not self._stopping and sum(j.n for j in q) < self.max_batch:
            remaining = hold_until - time.monotonic()
            if remaining <= 0:
                break
            self._cv.wait(remaining)
        batch, images = [q.popleft()], head.n
        while q and images + q[0].n <= self.max_batch:
            images += q[0].n
            batch.append(q.popleft())
        self._queued -= images
        self._running_until = time.monotonic() + self._batches_ms(head.stitch, images) / 1e3
        self._update_gauges_locked()
        return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                batch = self._next_batch_locked()
            if batch is None:
                return
            try:
                self._compute(batch)
            finally:
                with self._cv:
                    self._running_until = 0.0

    def _compute(self, batch: list[_Job]) -> None:
        """Run one batch and answer its requests; any failure is reported to each of them and
        the worker goes on."""
        stitch = batch[0].stitch
        start = time.monotonic()
        try:
            x = torch.cat([j.x for j in batch]) if len(batch) > 1 else batch[0].x
            n = x.shape[0]
            # Only a single request larger than max_batch gets here with n > max_batch: run it
            # in chunks, as _batches_ms predicts (and as memory was sized for).
            out, base_ms = [], 0.0
            for chunk in x.split(self.max_batch):
                t0 = time.monotonic()
                out.append(self.runner(chunk, stitch))
                chunk_ms = (time.monotonic() - t0) * 1e3
                b = chunk.shape[0]
                base_ms += self.latency.base_ms(stitch, b)
                if self.metrics:
                    self.metrics.compute_seconds.labels(str(stitch)).observe(chunk_ms / 1e3)
                    self.metrics.batch_size.observe(b)
            logits = torch.cat(out) if len(out) > 1 else out[0]
            compute_ms = (time.monotonic() - start) * 1e3
            if self.metrics:
                self.metrics.compute_profiled_seconds.labels(str(stitch)).inc(base_ms / 1e3)
            else:  # no metrics, no controller: correct the latency model directly
                self.latency.observe(stitch, n, compute_ms)
        except Exception as e:
            log.exception("batch of stitch %d failed", stitch)
            error = ComputeError(f"the model failed on stitch {stitch}: {type(e).__name__}: {e}")
            for j in batch:
                j.loop.call_soon_threadsafe(_resolve, j.future, None, error)
            return
        i = 0
        for j in batch:
            result = Result(logits[i : i + j.n], stitch, (start - j.enqueued) * 1e3, compute_ms, n)
            i += j.n
            if self.metrics:
                self.metrics.queue_seconds.observe(result.queue_ms / 1e3)
            with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits
                j.loop.call_soon_threadsafe(_resolve, j.future, result, None)
