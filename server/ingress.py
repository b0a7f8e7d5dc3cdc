"""The HTTP layer's own backlog: what a new request will wait before it even reaches the planner's
queue, and how long the HTTP work of one request takes.

A request's own HTTP work after it is planned (decoding and preprocessing its images, building
the answer) grows with its payload: a 170 KB JPEG costs milliseconds where a 300-byte PNG costs
tens of microseconds. It is predicted as ``a + b x payload bytes``, a least-squares line over the
recent answered requests (exponentially forgetting), seeded at start-up by timing the decoding
of two images on this machine.

Under load the event loop works through the requests it is parsing and decoding before it gets
back to a new one, so the planner adds their HTTP cost to every prediction. Requests already
queued for the model are not counted: their parsing is done, and counting them made a backlog
look like an HTTP jam and shed requests the model could still serve. Event-loop state: read and
written on the loop thread only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

ARRIVED = "snnet.arrived"  # ASGI scope key: time.monotonic() when the request reached the app


class Ingress:
    """Requests in the HTTP layer (not yet queued for the model), their cost and the loop's lag.

    Args:
        forget: Share of weight older requests lose with each new one in the cost line.
    """

    def __init__(self, forget: float = 0.02) -> None:
        self.forget = forget  # weight lost by older observations per new one
        # Exponentially weighted sums for the line ms = a + b * bytes (x in MB for conditioning).
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.seed([(0, 1.0)])  # until start-up measures: 1 ms a request, whatever its size
        self.http_ms = 1.0  # mean HTTP work of a whole request (what each one ahead costs)
        self.unqueued = 0  # requests inside /classify that have not reached the model queue
        self.loop_lag_ms = 0.0  # how late the event loop runs ready work (EWMA)
        # False while start-up runs in its thread: the loop's lag then is start-up's (profiling,
        # warm-up, a full GC at the end), not serving's, and it made the first request after
        # `ready` look ~35 ms dearer than it was (the README's 20 ms example got a 422).
        self.serving = True

    def seed(self, points: list[tuple[int, float]], weight: float = 5.0) -> None:
        """Start the cost line from measured (payload bytes, ms) points, replacing what was
        there; each counts as ``weight`` observations."""
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        for nbytes, ms in points:
            self._add(nbytes, ms, weight)

    def _add(self, nbytes: int, ms: float, weight: float) -> None:
        x = nbytes / 1e6
        self._w += weight
        self._x += weight * x
        self._y += weight * ms
        self._xx += weight * x * x
        self._xy += weight * x * ms

    def line(self) -> tuple[float, float]:
        """(a ms, b ms per byte) of the cost line; b >= 0 and a >= 0."""
        w, x, y = self._w, self._x, self._y
        var = w * self._xx - x * x
        b = max(0.0, (w * self._xy - x * y) / var) if var > 1e-12 * w * w else 0.0
        a = max(0.0, (y - b * x) / w)
        return a, b / 1e6

    def own_ms(self, payload_bytes: int) -> float:
        """Predicted HTTP work of a request, after planning, for its payload size."""
        a, b = self.line()
        return a + b * payload_bytes

    @contextmanager
    def entered(self) -> Iterator[_Ticket]:
        """Count a request in the backlog until ``ticket.queued()`` or the block ends."""
        ticket = _Ticket(self)
        self.unqueued += 1
        try:
            yield ticket
        finally:
            ticket.queued()

    def others(self) -> int:
        """Requests in the backlog besides the one asking."""
        return max(0, self.unqueued - 1)

    def wait_ms(self) -> float:
        """Predicted HTTP-layer wait of a new request: behind the others still being parsed, plus
        how late the event loop runs ready work now (requests not yet in a handler show only
        there)."""
        return self.others() * self.http_ms + self.loop_lag_ms

    def observe(self, payload_bytes: int, after_plan_ms: float, http_ms: float) -> None:
        """One answered request: its HTTP work after planning (decode, answer) and in all
        (its time minus queue wait and compute)."""
        keep = 1.0 - self.forget
        self._w *= keep
        self._x *= keep
        self._y *= keep
        self._xx *= keep
        self._xy *= keep
        self._add(payload_bytes, max(0.0, after_plan_ms), 1.0)
        self.http_ms += 0.1 * (max(0.0, http_ms) - self.http_ms)

    async def watch_loop_lag(self, period_s: float = 0.005) -> None:
        """Track how late the event loop wakes a sleeper: an EWMA of the oversleep, in ms."""
        loop = asyncio.get_running_loop()
        while True:
            t, counted = loop.time(), self.serving
            await asyncio.sleep(period_s)  # the instrument: how late this timer fires is the lag
            if counted and self.serving:  # a tick that began during start-up is start-up's
                late = max(0.0, (loop.time() - t - period_s) * 1e3)
                self.loop_lag_ms = 0.8 * self.loop_lag_ms + 0.2 * late


class _Ticket:
    def __init__(self, ingress: Ingress) -> None:
        self._ingress, self._counted = ingress, True

    def queued(self) -> None:
        """The request left the HTTP backlog (queued for the model, or answered with an error)."""
        if self._counted:
            self._counted = False
            self._ingress.unqueued -= 1
