"""The HTTP layer's own backlog: what a new request will wait before it even reaches the planner's
queue, and how long the HTTP work of one request takes.

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


class Ingress:
    """Requests in the HTTP layer (not yet queued for the model), their cost and the loop's lag.

    Args:
        smoothing: Weight of one answered request in the HTTP-cost average.
    """

    def __init__(self, smoothing: float = 0.1) -> None:
        self.smoothing = smoothing
        self.http_ms = 1.0  # HTTP-side cost of one request: total - queue wait - compute
        self.unqueued = 0  # requests inside /classify that have not reached the model queue
        self.loop_lag_ms = 0.0  # how late the event loop runs ready work (EWMA)

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

    def observe(self, total_ms: float, queue_ms: float, compute_ms: float) -> None:
        """One answered request: its HTTP cost is what its time was besides queue and compute."""
        http = max(0.0, total_ms - queue_ms - compute_ms)
        self.http_ms += self.smoothing * (http - self.http_ms)

    async def watch_loop_lag(self, period_s: float = 0.005) -> None:
        """Track how late the event loop wakes a sleeper: an EWMA of the oversleep, in ms."""
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(period_s)  # the instrument: how late this timer fires is the lag
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
