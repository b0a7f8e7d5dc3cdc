"""How long the model's threads waited for a CPU: the kernel's run delay (Linux
``/proc/.../schedstat``: the time a thread was runnable but not running).

A request's answer is what the idle estimates (the margin a 422 is judged on, the idle device
factor, the idle HTTP times, the cold extra) learn from when it was served alone. Alone in the
server is not alone on the machine: a co-tenant's busy loop makes the forward wait for a core,
and answers slowed by that taught the idle estimates a slowness the machine no longer had once
the co-tenant left (``bench/spell.py``). On this project's 2-core VM a forward of the bundled
model's cheapest stitch waited 0 ms (median and 90th percentile of 100 after 50 ms pauses, at
most 0.04 ms) on a quiet machine, and a scheduler slice (4 ms) in 15% of them beside two busy
loops (82% for its dearest stitch), every forward slower than 1.5x the median among those; the
quiet machine's slow forwards (steal, caches) did not wait, and stay idle evidence. Reading one
thread's figure costs 2 us in a loop, about 5 us after a forward.

Only the forward is measured, in the model's own threads (the model process's, all of them;
the in-thread runner's, used on CUDA, only the calling thread's: a torch thread of its pool
that waited holds the others at the next barrier without their being runnable, so such a wait
is missed, never invented): the event loop's thread waited
1.4-4.6 ms within a single 6-9 ms request on a quiet machine here (it and the model process
wake each other, and the kernel puts the woken one on the waker's core), so its run delay is
no sign of other work.

Where ``schedstat`` is missing (not Linux, a kernel without it) every figure is 0: nothing is
ever counted as contended, as before this was measured.
"""

from __future__ import annotations

import contextlib
import os
import threading

_TASKS = "/proc/self/task"

# A forward whose threads waited for a CPU more than this share of its time (on average over
# the threads that ran in it) was contended: its time is the machine's under load, not an idle
# one's. ``snnet serve`` on a quiet machine here: the bundled model (1 thread) at most 0.28 ms
# of 1.7-11 ms forwards, most 0, and beside two busy loops 2.9-4.0 ms; a DeiT-Ti/S/B net (2
# threads on the 2 cores, beside the event loop's wake-ups) 0.4-5.8% (summed over its two
# threads instead of their mean: 1-9%, too near this).
CONTENDED_SHARE = 0.1


def contended(wait_ms: float, span_ms: float) -> bool:
    """Whether work that took ``span_ms`` and waited ``wait_ms`` of it for a CPU was slowed by
    other work on the machine (see CONTENDED_SHARE)."""
    return wait_ms > CONTENDED_SHARE * span_ms


def _open(tid: int) -> int | None:
    try:
        return os.open(f"{_TASKS}/{tid}/schedstat", os.O_RDONLY)
    except OSError:
        return None


def _read(fd: int) -> tuple[int, int] | None:
    # "<ns on a CPU> <ns runnable, waiting for one> <times it got a CPU>" -> (the last two);
    # None: the thread is gone. (The first is brought up to date only at the scheduler's tick
    # or a switch: a thread reading its own saw no change over a 2 ms forward.)
    try:
        _, waited, slices = os.pread(fd, 128, 0).split()
        return int(waited), int(slices)
    except (OSError, ValueError):
        return None


Sample = list[tuple[int, int] | None]


class RunDelay:
    """The run delay of some threads of this process. ``of_thread()``: the calling thread's;
    ``of_process()``: every thread this process has when it is made (the model process's: its
    main thread and torch's). ``ms()``: their summed delay so far; ``sample()`` and
    ``waited_ms``: the mean delay of those that ran between two samples."""

    def __init__(self, tids: list[int]) -> None:
        me, self._fds, self._own = threading.get_native_id(), [], None
        for tid in tids:
            if (fd := _open(tid)) is not None:
                if tid == me:  # the calling thread: it runs the work between two samples
                    self._own = len(self._fds)
                self._fds.append(fd)

    @classmethod
    def of_thread(cls) -> RunDelay:
        return cls([threading.get_native_id()])

    @classmethod
    def of_process(cls) -> RunDelay:
        try:
            tids = sorted(int(t) for t in os.listdir(_TASKS))
        except OSError:
            tids = []
        return cls(tids)

    @property
    def available(self) -> bool:
        return bool(self._fds)

    def ms(self) -> float:
        """The threads' run delay so far. A thread that has exited counts no more (its file
        reads ESRCH), so a difference of two readings may be below 0: take it as 0."""
        return sum(r[0] for r in self.sample() if r is not None) / 1e6

    def sample(self) -> Sample:
        """Each thread's (ns on a CPU, ns waiting for one) so far, None for one that exited."""
        return [_read(fd) for fd in self._fds]

    def waited_ms(self, before: Sample, after: Sample) -> float:
        """The mean run delay, in ms, of the threads that ran between two samples (the one
        that took them, and any that got a CPU meanwhile): the share of a span of work that
        waited, whatever the thread count (the summed delay of a team of threads is up to that
        many times the span; threads that slept throughout, such as an idle pool's or a
        helper's, do not dilute it)."""
        waits = [
            a[0] - b[0]
            for i, (b, a) in enumerate(zip(before, after, strict=True))
            if b is not None and a is not None and (i == self._own or a[1] > b[1])
        ]
        return max(0.0, sum(waits) / len(waits) / 1e6) if waits else 0.0

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    __del__ = close  # (a thread's, as its thread ends: see ``thread_wait_ms``)


_local = threading.local()


def thread_wait_ms() -> float:
    """The calling thread's run delay so far, in ms (its file opened on its first call)."""
    waits = getattr(_local, "waits", None)
    if waits is None:
        waits = _local.waits = RunDelay.of_thread()
    return waits.ms()
