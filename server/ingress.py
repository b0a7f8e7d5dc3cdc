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
import copy
import statistics
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

ARRIVED = "snnet.arrived"  # ASGI scope key: time.monotonic() when the request reached the app
REST_WINDOW = 64  # requests served alone that the idle estimates take the median of
REST_MIN = 3  # fewer served alone: the idle estimates are the usual ones
REST_HIGH = 0.9  # the quantile of their reading time that a least budget counts
HTTP_MS_PRIOR = 1.0  # a request's HTTP work, in ms, before any was measured


# What each seed point of a line keeps of its weight for good (against an answer's 1): where
# every answer since has been of one size, the seed still gives the slope. Fading with the rest,
# the seed's weight fell below the fit's precision after some hundreds of answers of one size:
# the slope went to 0 (or, first, to noise), and a request of another size was predicted at
# theirs (a digit at a 4000x4000 PNG's 300 ms after 300 PNGs).
KEPT_WEIGHT = 0.1


class _Line:
    """``ms = a + b x bytes``: a least-squares line over observations that each lose ``forget``
    of their weight when a newer one comes, and its seed points, each kept at KEPT_WEIGHT."""

    def __init__(self, forget: float) -> None:
        self.forget = forget
        self.weight = 0.0
        self._x = self._y = self._xx = self._xy = 0.0  # weighted sums, x in MB (conditioning)
        self._kept = (0.0, 0.0, 0.0, 0.0, 0.0)  # the seed's sums at KEPT_WEIGHT

    def seed(self, points: list[tuple[int, float]], weight: float) -> None:
        """Replace what was learnt by these (bytes, ms) points, each worth ``weight``."""
        self.weight = self._x = self._y = self._xx = self._xy = 0.0
        for nbytes, ms in points:
            self._add(nbytes, ms, KEPT_WEIGHT)
        self._kept = (self.weight, self._x, self._y, self._xx, self._xy)
        self.weight = self._x = self._y = self._xx = self._xy = 0.0
        for nbytes, ms in points:
            self._add(nbytes, ms, weight)

    def add(self, nbytes: int, ms: float) -> None:
        keep = 1.0 - self.forget
        self.weight *= keep
        self._x *= keep
        self._y *= keep
        self._xx *= keep
        self._xy *= keep
        self._add(nbytes, ms, 1.0)

    def _add(self, nbytes: int, ms: float, weight: float) -> None:
        x = nbytes / 1e6
        self.weight += weight
        self._x += weight * x
        self._y += weight * ms
        self._xx += weight * x * x
        self._xy += weight * x * ms

    def coefficients(self) -> tuple[float, float]:
        """(a ms, b ms per byte); both >= 0. (0, 0) before any observation."""
        kw, kx, ky, kxx, kxy = self._kept
        w, x, y = self.weight + kw, self._x + kx, self._y + ky
        if w <= 0:
            return 0.0, 0.0
        xx, xy = self._xx + kxx, self._xy + kxy
        var = w * xx - x * x
        b = max(0.0, (w * xy - x * y) / var) if var > 1e-12 * w * w else 0.0
        a = max(0.0, (y - b * x) / w)
        return a, b / 1e6

    def at(self, nbytes: int) -> float:
        a, b = self.coefficients()
        return a + b * nbytes


class Ingress:
    """Requests in the HTTP layer (not yet queued for the model), their cost and the loop's lag.

    Two sets of estimates: what requests cost now (admission plans with these; under a burst
    they include waiting for a busy event loop and CPU contention), and what they cost on an
    idle server, learnt only from requests served alone: planned with nobody else in the HTTP
    layer and nothing queued or running in the model, and no request arrived before their
    answer (one that was only encoding its answer then is not seen). A 422 ("too tight even when idle") is
    judged on the second, so load never makes a client's budget look impossible.

    Args:
        forget: Share of weight older requests lose with each new one in the cost lines.
    """

    def __init__(self, forget: float = 0.02, prior_ms: float = HTTP_MS_PRIOR) -> None:
        self.prior_ms = prior_ms  # a request's HTTP time before any was measured
        self._own = _Line(forget)  # HTTP work after planning (decode, answer), every request
        self._seeded = _Line(forget)  # the same as start-up measured it (``seed``)
        # Requests served alone: (reading and parsing with the event loop's lag then, i.e. all
        # that admission counts before their own work; own work after planning), each less the
        # own line's cost per byte. Their medians: one stalled request (a first request's cold
        # paths, a GC pause) must not make a budget look impossible.
        self._rest: deque[tuple[float, float]] = deque(maxlen=REST_WINDOW)
        self._rest_medians = (0.0, 0.0)  # of the two, updated as one is added
        self._rest_pre_high = 0.0  # their reading and parsing, REST_HIGH quantile
        # A request's HTTP time in all (what each one in the backlog costs the others), a line
        # in its size too: one number for every size, after ten 4000x4000 PNGs, made a burst
        # of digits wait for ten photos' worth each, and refused most of it 503 (session 35).
        # Forgetting a tenth of the weight an answer, as the moving mean it replaces did.
        self._http = _Line(0.1)
        self.seed([(0, prior_ms)])  # until start-up measures, whatever its size
        self.unqueued = 0  # requests inside /classify that have not reached the model queue
        self.backlog_ms = 0.0  # their predicted HTTP times, summed (see ``entered``)
        self.arrivals = 0  # requests that have entered, ever (a request is alone if none came)
        self.loop_lag_ms = 0.0  # how late the event loop runs ready work (EWMA)
        # False while start-up runs in its thread: the loop's lag then is start-up's (profiling,
        # warm-up, a full GC at the end), not serving's, and it made the first request after
        # `ready` look ~35 ms dearer than it was (the README's 20 ms example got a 422).
        self.serving = True

    def seed(self, points: list[tuple[int, float]], weight: float = 5.0) -> None:
        """Start the own-work line from measured (payload bytes, ms) points, replacing what was
        there; each counts as ``weight`` observations. The whole HTTP time's line starts from
        them too, at least ``prior_ms``, as ten answers' worth (a moving mean's prior)."""
        self._own.seed(points, weight)
        self._seeded = copy.copy(self._own)
        self._http.seed([(b, max(ms, self.prior_ms)) for b, ms in points], 10.0 / len(points))

    def http_ms(self, payload_bytes: int = 0) -> float:
        """Predicted HTTP time of a request of this size in all (read, parsed, decoded,
        answered, with the waits for the event loop that requests lately had)."""
        return self._http.at(payload_bytes)

    def own_ms(self, payload_bytes: int) -> float:
        """Predicted HTTP work of a request, after planning, for its payload size."""
        return self._own.at(payload_bytes)

    def rest_ms(self, payload_bytes: int) -> tuple[float, float]:
        """(reading and parsing with the loop's lag, own work after planning) of a request of
        this size on an idle server, in ms: the medians of the last requests served alone, plus
        the own line's cost per byte. Until REST_MIN of them, what start-up measured: its own
        line (decoding), and the prior HTTP time (``prior_ms``) less it. Not what the other
        requests took: a fresh server whose first traffic is a burst learnt the burst's backlog
        from them (the bundled model's idle need read 11-17 ms for its 5-6, and 403 of 480
        requests at 8 ms were refused 422 as impossible even when idle; a lone client after the
        burst then for good, as a refusal teaches nothing)."""
        if len(self._rest) < REST_MIN:
            own = self._seeded.at(payload_bytes)
            return max(0.0, self.prior_ms - own), own
        per_byte = self._own.coefficients()[1] * payload_bytes
        pre, own = self._rest_medians
        return max(0.0, pre + per_byte), max(0.0, own + per_byte)

    @property
    def rest_known(self) -> bool:
        """Whether enough requests were served alone for the idle estimates to be theirs."""
        return len(self._rest) >= REST_MIN

    def rest_pre_high_ms(self, payload_bytes: int) -> float:
        """Reading and parsing a request of this size on an idle server, as ``rest_ms`` but at
        the REST_HIGH quantile of the requests served alone instead of their median: what a
        least budget counts, so that a client that retries with it is admitted (at the median,
        half of those retries were refused with a 503 for the few tenths of a ms their own
        reading ran over it)."""
        pre = self.rest_ms(payload_bytes)[0]
        if len(self._rest) < REST_MIN:
            return pre
        per_byte = self._own.coefficients()[1] * payload_bytes
        return max(pre, self._rest_pre_high + per_byte)

    @contextmanager
    def entered(self, payload_bytes: int = 0) -> Iterator[_Ticket]:
        """Count a request in the backlog until ``ticket.queued()`` or the block ends: until
        it is parsed (``ticket.sized``) at a request's HTTP time whatever its size (reading a
        body costs little by the byte; decoding does, and may never come: counted by their
        declared length, 20 bombs of 388 KB, each refused at its header, were predicted as 20
        photos' decoding ahead of 20 digits beside them, and 16 of the digits refused 503),
        or of ``payload_bytes`` if it is known (a front's request, parsed there)."""
        ticket = _Ticket(self, self.http_ms(payload_bytes))
        self.unqueued += 1
        self.backlog_ms += ticket.ms
        self.arrivals += 1
        try:
            yield ticket
        finally:
            ticket.queued()

    def others(self) -> int:
        """Requests in the backlog besides the one asking."""
        return max(0, self.unqueued - 1)

    def wait_ms(self, payload_bytes: int | None = None) -> float:
        """Predicted HTTP-layer wait of a request in the backlog, of ``payload_bytes`` (its cost
        size, as its ticket was ``sized``): behind the others still being parsed (the backlog's
        predicted HTTP times less its own; without a size, less an even share), plus how late
        the event loop runs ready work now (requests not yet in a handler show only there)."""
        if not self.others():
            return self.loop_lag_ms
        own = (
            self.backlog_ms / self.unqueued
            if payload_bytes is None
            else self.http_ms(payload_bytes)
        )
        return max(0.0, self.backlog_ms - own) + self.loop_lag_ms

    def observe(
        self,
        payload_bytes: int,
        after_plan_ms: float,
        http_ms: float,
        *,
        alone: bool = False,
        spent_ms: float = 0.0,
    ) -> None:
        """One answered request: its HTTP work after planning (decode, answer) and in all
        (its time minus queue wait and compute); if it was ``alone``, also what admission
        counted before its own work (``spent_ms``: read and parsed, and the loop's lag), for the
        idle estimates."""
        after = max(0.0, after_plan_ms)
        self._own.add(payload_bytes, after)
        self._http.add(payload_bytes, max(0.0, http_ms))
        if alone:
            per_byte = self._own.coefficients()[1] * payload_bytes
            self._rest.append((max(0.0, spent_ms) - per_byte, after - per_byte))
            pres = sorted(p for p, _ in self._rest)
            self._rest_medians = (
                statistics.median(pres),
                statistics.median(o for _, o in self._rest),
            )
            self._rest_pre_high = pres[int(REST_HIGH * (len(pres) - 1))]

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
    def __init__(self, ingress: Ingress, ms: float) -> None:
        self._ingress, self._counted, self.ms = ingress, True, ms

    def queued(self) -> None:
        """The request left the HTTP backlog (queued for the model, or answered with an error)."""
        if self._counted:
            self._counted = False
            ing = self._ingress
            ing.unqueued -= 1
            ing.backlog_ms = ing.backlog_ms - self.ms if ing.unqueued else 0.0

    def sized(self, payload_bytes: int) -> None:
        """The request is parsed, its images' headers checked: count it at the HTTP time
        predicted for its payload's cost size (``ClassifyRequest.payload_bytes``, what the line
        is fitted on: a flat 4000x4000 PNG of 46 KB decodes as 8 MB of photo)."""
        if self._counted:
            ms = self._ingress.http_ms(payload_bytes)
            self._ingress.backlog_ms += ms - self.ms
            self.ms = ms
