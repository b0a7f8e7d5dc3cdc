"""Scheduler: earliest-deadline-first queues per stitch, the batcher, and the worker that feeds
the model.

One worker thread feeds the model, which runs in that thread or in a child process
(``server.runner``); torch already spreads one forward over the CPU's cores, and a GPU runs one
stream at a time. The one exception: a small request that finds a child process idle and nothing
queued is sent to it by the event loop, which reads the answer too (``submit``). Requests wait
in one queue per stitch, each in deadline order; the worker serves the queue whose head has the
earliest deadline, and holds a batch open for more requests of the same stitch until it is
full, ``max_batch_wait`` has passed, or the head's deadline would be at risk. A request of more images than ``max_batch`` runs as consecutive batches of at most
``max_batch``.

The scheduler decides nothing about which stitch a request gets: ``view`` shows the planner
(``server.planner``) the queue as a new request due at a given deadline would meet it, and
``submit`` queues what the planner admitted.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cpuwait import contended
from .errors import ComputeError, Refusal
from .latency import LatencyModel
from .metrics import Metrics

# The largest tensor the event loop hands the model process itself as bytes through the socket
# (``Scheduler.submit``): the write must never wait for the child to read, and a Unix socket's
# buffer holds this much. A batch that crosses by shared memory (``ProcessRunner.shares``)
# takes one fixed-size message at any size.
DIRECT_MAX_BYTES = 64 * 1024

# A batch that starts after the model has been idle this long runs "cold": caches, and on a VM
# the halted vCPUs, make the first forward after a pause slower than the warm profile. By about
# the same time whatever the stitch (2-core VM, one pause of 0.5 s before each, medians: the
# bundled model's stitches of 2.2-8.2 ms took 0.6-1.2 ms more in the server, DeiT-Ti/S/B's of
# 28-271 ms 1.4-4.5 ms more), so it is learnt and planned as milliseconds added to the batch,
# not as a factor (a factor learnt on the cheapest stitch, 2x, planned the dearest about 8 ms
# too long); and after any pause of 50 ms or more (the cheapest stitch alone: +1.2 ms after 50 ms,
# the same after 1 s).
COLD_GAP_S = 0.05
# The extra planned is the median of the last this many cold batches' (a stall in one moves
# nothing; a machine that turned slower after pauses moves it within three).
COLD_WINDOW = 5
# Start-up times this many batches of the cheapest stitch, each after COLD_PROBE_GAP_S idle, and
# seeds the window with them (one batch, on six starts of the bundled model, read 1.5x-3.7x:
# the least budget a 422 named for its cheapest stitch ranged 5.4-8.9 ms).
COLD_PROBES = 3
COLD_PROBE_GAP_S = 0.2

log = logging.getLogger("snnet.scheduler")


Runner = Callable[[torch.Tensor, int], torch.Tensor]  # (x, stitch) -> float32 logits on the CPU


@dataclass(frozen=True)
class QueueView:
    """The queue as a new request due at some deadline meets it (see ``Scheduler.view``)."""

    ahead_ms: float  # predicted work that runs before it: the batch in flight + jobs due sooner
    counts: dict[int, int]  # images per stitch among the jobs due sooner (same-stitch batches)
    later_slack_ms: float  # least slack among jobs due later: what it may delay them by
    busy: bool  # a batch is running or a job is queued


@dataclass
class Result:
    logits: torch.Tensor  # (n, classes) float32 on the CPU
    stitch: int
    queue_ms: float  # enqueued -> its batch started
    compute_ms: float  # the batch's model time
    batch_size: int
    wait_ms: float = 0.0  # of it, the model's threads waited for a CPU (``server.cpuwait``)


@dataclass
class _Job:
    x: torch.Tensor  # (n, C, H, W) float32
    stitch: int
    deadline: float  # monotonic seconds
    enqueued: float
    future: asyncio.Future = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    withdrawn: bool = False  # taken out of its queue unrun: its client went away

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def order(self) -> tuple[float, float]:
        return self.deadline, self.enqueued


def _resolve(fut: asyncio.Future, value: object, error: BaseException | None) -> None:
    if fut.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


class Scheduler:
    """EDF queues per stitch and the worker thread that runs their batches.

    Args:
        latency: Predicted compute per (stitch, batch size).
        runner: Runs one batch: ``runner(x, stitch) -> logits`` (``server.runner``).
        stitches: Number of stitches (one queue each).
        max_batch: Largest batch formed from several requests.
        max_wait_ms: Longest a batch is held open for more requests.
        max_queue: Images allowed to wait in all queues together.
        metrics: Where queue depth, batch sizes and compute times go (the controller reads the
            compute times from there).
    """

    def __init__(
        self,
        latency: LatencyModel,
        runner: Runner,
        *,
        stitches: int,
        max_batch: int,
        max_wait_ms: float,
        max_queue: int,
        metrics: Metrics,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"max_batch and max_queue must be >= 1 and max_wait_ms >= 0, got "
                f"{max_batch}, {max_queue}, {max_wait_ms}"
            )
        self.latency, self.runner, self.metrics = latency, runner, metrics
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_ms / 1e3, max_queue
        self._cv = threading.Condition()
        self._queues: dict[int, deque[_Job]] = {s: deque() for s in range(stitches)}
        self._queued = 0  # images waiting
        self._running_until = 0.0  # predicted monotonic end of the batch being computed
        self._running = False
        self._stopping = False
        # When the model last finished a batch (start-up counts: warm-up ran before), and how
        # much longer than predicted the last batches that started cold ran (ms).
        self._idle_since = time.monotonic()
        self._cold: deque[float] = deque(maxlen=COLD_WINDOW)
        self._cold_ms = 0.0  # their median
        self._cold_at_rest_ms = 0.0  # the extra measured at start-up, on a quiet machine
        self.direct_batches = 0  # sent to the model process by the event loop (``submit``)
        self.holding: _Job | None = None  # the head whose batch is held open (tests read it)
        self._thread: threading.Thread | None = None

    # -- prediction ---------------------------------------------------------------------------

    def batches_ms(self, stitch: int, images: int) -> float:
        """Predicted compute of ``images`` images of one stitch, in batches of ``max_batch``."""
        if images <= 0:
            return 0.0
        full, rest = divmod(images, self.max_batch)
        ms = full * self.latency.predict_ms(stitch, self.max_batch)
        return ms + (self.latency.predict_ms(stitch, rest) if rest else 0.0)

    def cold_ms(self, now: float) -> float:
        """The ms to add to the predicted compute of a batch that would start at ``now``: what
        batches after an idle gap have taken over their prediction (learned, at least 0), if
        the model has been idle longer than ``COLD_GAP_S``; else 0."""
        with self._cv:
            idle = not self._running and self._queued == 0
            cold = idle and now - self._idle_since > COLD_GAP_S
        return self.cold_planning_ms if cold else 0.0

    @property
    def cold_planning_ms(self) -> float:
        """What a batch after an idle gap is planned with on top of its prediction: the learned
        extra, at least 0 (a pause never speeds a batch up)."""
        return max(0.0, self._cold_ms)

    @property
    def cold_at_rest_ms(self) -> float:
        """The extra of a quiet machine (``probe_cold``'s, at least 0; 0 if not probed): what a
        422 may count. The learned extra also rises under CPU contention, which is load."""
        return max(0.0, self._cold_at_rest_ms)

    @property
    def cold_extra_ms(self) -> float:
        """How much longer than predicted the last COLD_WINDOW batches that started cold ran
        (ms, median; 0 until seen; below 0 where predictions run high)."""
        return self._cold_ms

    def probe_cold(
        self,
        stitch: int,
        input_size: tuple[int, ...],
        gap_s: float = COLD_PROBE_GAP_S,
        probes: int = COLD_PROBES,
    ) -> float:
        """Seed the cold extra before the first request (call before ``start``): ``probes``
        times, leave the model idle for ``gap_s``, then time one single-image batch of
        ``stitch`` against its prediction; the median extra, in ms. Without it the first
        request after a quiet start is planned as if warm; on this project's 2-core VM such a
        first batch of the bundled model's cheapest stitch ran 1-5 ms over its 2 ms."""
        if self._thread is not None:
            raise RuntimeError("probe_cold runs before the scheduler starts")
        x = torch.zeros(1, *input_size)
        predicted = self.latency.predict_ms(stitch, 1)
        self._cold.clear()
        for _ in range(probes):
            time.sleep(gap_s)
            t0 = time.monotonic()
            self.runner(x, stitch)
            ms = (time.monotonic() - t0) * 1e3
            if not contended(getattr(self.runner, "last_wait_ms", 0.0), ms):  # (see _answered)
                self.learn_cold(ms, predicted)
        self._cold_at_rest_ms = self._cold_ms
        self._idle_since = time.monotonic()
        return self._cold_ms

    def relax_cold(self) -> None:
        """A request was refused while the model sat idle: halve what each of the last cold
        batches ran over start-up's extra. Nothing else would move it: a refused request runs
        no batch, and a lone client whose budget the learnt extra no longer fits was refused
        at every retry (a noisy spell on the 2-core VM left the bundled model's extra at 6.1 ms
        for a stitch that took 1.7 ms more at start-up: 503 "batches after a pause take 6.1 ms
        over" to every budget between, until a looser one ran)."""
        with self._cv:
            rest = self.cold_at_rest_ms
            self._cold = deque(
                (rest + (v - rest) / 2 if v > rest else v for v in self._cold), maxlen=COLD_WINDOW
            )
            if self._cold:
                self._cold_ms = statistics.median(self._cold)

    def learn_cold(self, compute_ms: float, predicted_ms: float) -> None:
        """One cold batch's observed against predicted compute."""
        if predicted_ms > 0:
            with self._cv:  # (the worker thread's batches and the event loop's, see ``submit``)
                self._cold.append(compute_ms - predicted_ms)
                self._cold_ms = statistics.median(self._cold)

    def view(self, deadline: float, now: float) -> QueueView:
        """The queue in deadline order, as a new job due at ``deadline`` (monotonic s) meets it.

        The work ahead of it is the batch in flight and every queued job due no later, in
        per-stitch batches; a job of the same stitch joins their batches (``counts``). The jobs
        due later that are predicted to make their deadlines may be delayed by at most
        ``later_slack_ms``.
        """
        with self._cv:
            jobs = sorted((j for q in self._queues.values() for j in q), key=lambda j: j.order)
            running_ms = max(0.0, self._running_until - now) * 1e3
            busy = self._running or bool(jobs)
        total, counts = running_ms, {}
        ahead: tuple[float, dict[int, int]] | None = None
        later_slack = math.inf
        for j in jobs:
            if ahead is None and j.deadline > deadline:
                ahead = (total, dict(counts))
            c = counts.get(j.stitch, 0)
            total += self.batches_ms(j.stitch, c + j.n) - self.batches_ms(j.stitch, c)
            counts[j.stitch] = c + j.n
            if ahead is not None:
                slack = (j.deadline - now) * 1e3 - total
                if slack >= 0:  # one already late is not protected: it cannot be saved
                    later_slack = min(later_slack, slack)
        if ahead is None:
            ahead = (total, counts)
        return QueueView(ahead[0], ahead[1], later_slack, busy)

    def predicted_wait_ms(self, now: float) -> float:
        """Predicted wait of a new request behind everything queued and running at ``now``."""
        with self._cv:
            return max(0.0, self._running_until - now) * 1e3 + self._queued_work_locked()

    def queued_work_ms(self) -> float:
        """Predicted compute of everything waiting (not the batch running now)."""
        with self._cv:
            return self._queued_work_locked()

    def _queued_work_locked(self) -> float:
        return sum(self.batches_ms(s, sum(j.n for j in q)) for s, q in self._queues.items() if q)

    @property
    def queued_images(self) -> int:
        return self._queued

    def waiting(self, future: asyncio.Future) -> bool:
        """Whether the job of ``future`` (from ``submit``) waits in a queue: one sent to the
        model straight from ``submit`` does not, and only a waiting one can be withdrawn."""
        with self._cv:
            if self._queued == 0:
                return False
            return any(j.future is future for q in self._queues.values() for j in q)

    # -- queueing -----------------------------------------------------------------------------

    def submit(self, x: torch.Tensor, stitch: int, deadline: float, now: float) -> asyncio.Future:
        """Queue ``x`` (n, C, H, W) for ``stitch``, due at ``deadline`` (monotonic s); the
        returned future resolves to a Result. Must be called from the event loop's thread.

        When the model is idle and nothing waits, a small request goes to a model process
        straight from here and its answer is read by the event loop (``_dispatch``): the batch
        the worker thread would form is this request alone (no batch is held open at
        ``max_wait_ms`` 0), and the worker's two thread hand-offs are skipped (on the 2-core VM
        a digit's round trip fell by 0.06-0.09 ms, its overhead outside the model by 0.1 ms).

        Raises:
            Refusal: 503 when the queue is full or the server is shutting down.
        """
        loop = asyncio.get_running_loop()
        job = _Job(x, stitch, deadline, now, loop.create_future(), loop)
        with self._cv:
            if self._stopping:
                raise Refusal(503, "the server is shutting down; retry on another replica", 1)
            if self._queued + job.n > self.max_queue:
                why = f"queue full: {self._queued} images waiting, limit {self.max_queue}; retry later"
                self.metrics.count_shed(why, "queue_full")
                raise Refusal(503, why, 1)
            direct = self._direct_locked(job)
            if not direct:
                self._enqueue_locked(job)
        if direct:
            try:
                sent = self._dispatch(job)
            except BaseException:  # nothing was sent (a bad batch): the model is free again
                with self._cv:
                    self._running, self._running_until = False, 0.0
                    self._cv.notify_all()
                raise
            if not sent:
                with self._cv:  # the model process is gone: the worker starts another and runs it
                    self._running = False
                    self._enqueue_locked(job)
        return job.future

    def _enqueue_locked(self, job: _Job) -> None:
        """Queue ``job`` (on the event loop's thread)."""
        # Each queue in deadline order: batches take the most urgent jobs of their stitch.
        bisect.insort(self._queues[job.stitch], job, key=lambda j: j.order)
        self._queued += job.n
        self.metrics.queue_depth.set(self._queued)
        self._cv.notify_all()
        # A request whose client went away (a gRPC deadline or cancel cancels its future)
        # leaves the queue: its batch would be work nobody waits for, and the planner would
        # count it ahead of every request still waiting.
        job.future.add_done_callback(lambda fut: fut.cancelled() and self._withdraw(job))

    def withdraw(self, future: asyncio.Future) -> bool:
        """Take the job of ``future`` (from ``submit``) out of its queue unrun and cancel the
        future; False, and nothing done, if no queue holds it (it went to the model at once, or
        a batch has taken it: it runs). Atomic with the worker's taking of batches: a job
        withdrawn is never in a batch (a front frees a withdrawn job's shared pages at once).
        On the event loop's thread."""
        with self._cv:
            job = next((j for q in self._queues.values() for j in q if j.future is future), None)
            if job is None or not self._remove_locked(job):
                return False
        future.cancel()  # (its done-callback finds it gone)
        return True

    def _withdraw(self, job: _Job) -> None:
        """Take a cancelled job out of its queue, if no batch has taken it yet."""
        with self._cv:
            self._remove_locked(job)

    def _remove_locked(self, job: _Job) -> bool:
        q = self._queues[job.stitch]
        i = next((i for i, j in enumerate(q) if j is job), None)  # (not ==: tensors)
        if i is None:
            return False
        del q[i]
        job.withdrawn = True
        self._queued -= job.n
        self.metrics.queue_depth.set(self._queued)
        self.metrics.withdrawn.inc(job.n)
        self._cv.notify_all()  # a batch held open for it is not held any more
        return True

    def _direct_locked(self, job: _Job) -> bool:
        """Whether ``job`` runs from the event loop now (see ``submit``); if so, the model is
        marked busy with it."""
        ready = getattr(self.runner, "ready", False)  # a ProcessRunner whose child is up
        if not (
            ready
            and self._thread is not None
            and not self._running
            and self._queued == 0
            and self.max_wait_s == 0
            and job.n <= self.max_batch
            and (job.x.numel() * 4 <= DIRECT_MAX_BYTES or self.runner.shares(job.x))
        ):
            return False
        self._running = True
        self._running_until = time.monotonic() + self.batches_ms(job.stitch, job.n) / 1e3
        return True

    def _dispatch(self, job: _Job) -> bool:
        """Hand ``job`` to the model process and have the event loop read its answer; False if
        the process is gone (nothing was sent)."""
        start = time.monotonic()
        cold = start - self._idle_since > COLD_GAP_S
        try:
            self.runner.send(job.x, job.stitch)
        except OSError:
            return False
        fd = self.runner.fileno()
        job.loop.add_reader(fd, self._dispatched, job, fd, start, cold)
        self.direct_batches += 1
        return True

    def _dispatched(self, job: _Job, fd: int, start: float, cold: bool) -> None:
        """The event loop's side of ``_dispatch``: the model process answered (or died)."""
        job.loop.remove_reader(fd)
        # uvloop made the socket non-blocking to watch it: a read could then stop halfway
        # through the answer, and the worker thread's next read fail at once (EAGAIN).
        os.set_blocking(fd, True)
        try:
            logits = self.runner.finish(job.stitch)
            self._observe(job.stitch, job.n, time.monotonic() - start)
            waited = self.runner.last_wait_ms
            answers = self._answered([job], job.stitch, start, cold, logits, waited)
        except Exception as e:
            answers = self._failed([job], job.stitch, e)
        with self._cv:  # idle again before the answer, as after the worker's batches
            self._running, self._running_until = False, 0.0
            self._idle_since = time.monotonic()
            # Requests that queued meanwhile are the worker's now; a stop waits for idle. Else
            # nobody needs waking: a woken worker finds nothing and waits again, but first takes
            # the GIL from this loop (py-spy: 40 us of each sequential request went there).
            if self._queued or self._stopping:
                self._cv.notify_all()
        for j, value, error in answers:
            _resolve(j.future, value, error)

    # -- worker -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("scheduler already started")
        self._thread = threading.Thread(target=self._run, name="snnet-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, finish everything queued, then stop the worker. Call it off the
        event loop: a batch sent from the loop (``_dispatch``) ends there."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cv:
            self._cv.wait_for(lambda: not self._running, 60 if timeout is None else timeout)

    def _next_batch_locked(self) -> list[_Job] | None:
        """Wait for work, pick the queue with the earliest deadline, form its batch."""
        while True:
            while True:
                heads = [q[0] for q in self._queues.values() if q]
                if heads and not self._running:  # (running: a batch the event loop sent)
                    break
                if self._stopping and not heads:
                    return None
                self._cv.wait()
            head = min(heads, key=lambda j: j.order)
            q = self._queues[head.stitch]
            # Hold the batch open for more requests of this stitch, but never past the point
            # where the head would miss its deadline, and not at all when shutting down.
            hold_until = head.enqueued + self.max_wait_s
            slack = head.deadline - self.latency.predict_ms(head.stitch, self.max_batch) / 1e3
            hold_until = min(hold_until, slack)
            self.holding = head
            while (
                not self._stopping and not head.withdrawn and sum(j.n for j in q) < self.max_batch
            ):
                remaining = hold_until - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            self.holding = None
            if not head.withdrawn:
                break
            # (its client went away while the batch was held open: choose again)
        first = q.popleft()  # (the head, or one of its stitch due sooner that came meanwhile)
        batch, images = [first], first.n
        while q and images + q[0].n <= self.max_batch:
            images += q[0].n
            batch.append(q.popleft())
        self._queued -= images
        self._running = True
        self._running_until = time.monotonic() + self.batches_ms(head.stitch, images) / 1e3
        self.metrics.queue_depth.set(self._queued)
        return batch

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                batch = self._next_batch_locked()
            if batch is None:
                return
            answers = self._compute(batch)
            # Idle again before anyone hears back: a client that sends its next request as soon
            # as it has the answer must find the model free, not a batch predicted to be running.
            with self._cv:
                self._running, self._running_until = False, 0.0
                self._idle_since = time.monotonic()
            for job, value, error in answers:
                with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody waits
                    job.loop.call_soon_threadsafe(_resolve, job.future, value, error)

    def _compute(self, batch: list[_Job]) -> list[tuple[_Job, Result | None, Exception | None]]:
        """Run one batch; the answer (or the failure) for each of its jobs."""
        stitch = batch[0].stitch
        start = time.monotonic()
        cold = start - self._idle_since > COLD_GAP_S
        try:
            x = torch.cat([j.x for j in batch]) if len(batch) > 1 else batch[0].x
            # Only a single request larger than max_batch gets here with n > max_batch: run it
            # in chunks, as batches_ms predicts (and as memory was sized for).
            out, waited = [], 0.0
            for chunk in x.split(self.max_batch):
                t0 = time.monotonic()
                out.append(self.runner(chunk, stitch))
                self._observe(stitch, chunk.shape[0], time.monotonic() - t0)
                waited += getattr(self.runner, "last_wait_ms", 0.0)  # (a plain function: 0)
            logits = torch.cat(out) if len(out) > 1 else out[0]
            return self._answered(batch, stitch, start, cold, logits, waited)
        except Exception as e:
            return self._failed(batch, stitch, e)

    def _observe(self, stitch: int, images: int, seconds: float) -> None:
        """One forward's metrics."""
        self.metrics.compute_seconds.labels(str(stitch)).observe(seconds)
        self.metrics.batch_size.observe(images)

    def _answered(
        self,
        batch: list[_Job],
        stitch: int,
        start: float,
        cold: bool,
        logits: torch.Tensor,
        waited: float = 0.0,
    ) -> list[tuple[_Job, Result, None]]:
        """A batch's results, and what it teaches: the cold extra (a cold batch whose threads
        did not wait for a CPU: that is load, not the pause) and the profiled time of what ran.
        """
        compute_ms = (time.monotonic() - start) * 1e3
        n = logits.shape[0]
        self.metrics.model_cpu_wait_seconds.inc(waited / 1e3)
        if cold and not contended(waited, compute_ms):
            self.learn_cold(compute_ms, self.batches_ms(stitch, n))
        # The controller corrects the latency model from compute_seconds and this (one law:
        # observed / profiled compute, see server.controller).
        full, rest = divmod(n, self.max_batch)
        sizes = [self.max_batch] * full + ([rest] if rest else [])
        base_ms = sum(self.latency.base_ms(stitch, b) for b in sizes)
        self.metrics.compute_profiled_seconds.labels(str(stitch)).inc(base_ms / 1e3)
        answers, i = [], 0
        finite = bool(torch.isfinite(logits).all())
        for j in batch:
            mine = logits[i : i + j.n]
            i += j.n
            if not finite and not bool(torch.isfinite(mine).all()):
                # NaN answers became a 500 "internal error" where JSON cannot carry them, or
                # NaN probabilities in binary: say what happened (a V2 client's out-of-range
                # tensor is turned into a 422 by its route)
                error = ComputeError(f"the model's answer on stitch {stitch} is NaN or infinite")
                answers.append((j, None, error))
                continue
            result = Result(mine, stitch, (start - j.enqueued) * 1e3, compute_ms, n, waited)
            self.metrics.queue_seconds.observe(result.queue_ms / 1e3)
            answers.append((j, result, None))
        return answers

    def _failed(
        self, batch: list[_Job], stitch: int, e: Exception
    ) -> list[tuple[_Job, None, ComputeError]]:
        log.error("batch of stitch %d failed", stitch, exc_info=e)
        error = ComputeError(f"the model failed on stitch {stitch}: {type(e).__name__}: {e}")
        return [(j, None, error) for j in batch]
