"""The planner: the one place that decides which stitch serves a request, or refuses it.

``Planner.plan(options, n_images, now)`` combines everything a decision needs, in this order:

1. **The menu the request allows**: an explicit ``stitch_id``, a ``max_gflops`` cap, or every
   stitch; a baseline ``policy`` (benchmarks only) narrows it to one stitch.
2. **The budget**: the request's ``latency_budget_ms`` or ``SNNET_DEFAULT_BUDGET_MS``, less
   ``SNNET_NETWORK_MS`` (time the server cannot see). A budget no stitch on the menu meets even
   on an idle server is a 422 that says the least budget that would do.
3. **Slack first**: a request that finds the model idle and nobody else in the HTTP layer gets
   the most accurate stitch that fits, whatever the arrival rate. Only while the server is busy
   does the controller's load level (with its hull mix) narrow a menu of more than one stitch:
   then arrivals, not this request's budget, are what threaten the queue (an open-loop surge).
4. **Admission**, the same for every request: its predicted time (what it already spent being
   read and parsed + the HTTP backlog + its own HTTP work for its payload size + the work due
   before it under earliest-deadline-first + its own batch + the controller's safety margin)
   fits its budget, and its compute fits in the slack of every queued request due later.
   Otherwise 503 with Retry-After; or 422 if nothing was ahead of it and even an idle server
   could not meet the budget with a margin fitted to 95% of its answers (``refuse_quantile``),
   as waiting would not help. Between the two (it finds the server idle and the fastest stitch
   meets the budget with that margin, not the full one), the fastest stitch serves it, "best
   effort": counted apart from the promise (``Plan.best_effort``). A request that finds
   the server idle is predicted with what requests served alone took (``Ingress.rest_ms``,
   ``Controller.rest_margin``), any other with what recent requests took: a burst's busy
   event loop and contention are load, and never turn a budget into a 422.

It reads the scheduler's queue, the controller and the HTTP backlog, and is given the clock, so
tests drive it without threads, HTTP or sleeping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from snnet_core import StitchMenu, UnknownStitch

from .controller import Controller
from .errors import Refusal
from .ingress import REST_MIN, Ingress
from .scheduler import QueueView, Scheduler
from .schemas import ClassifyOptions

# For this long after a 503 no request teaches the idle estimates (``Plan.alone_at``): in a
# burst mostly shed at the door the queue is often empty, and a client on a starved CPU sends
# nothing while the model computes, so an answer of the burst passed for one served alone.
SHED_QUIET_S = 1.0
# A least budget is named rounded up to 0.01 ms, past float noise (1.8000000003 is 1.80):
# admission lets a total exceed the budget by this much, so a retry with it is admitted.
ROUNDING_MS = 1e-6
# Of requests found alone that a 422 would refuse though the fastest stitch fits their budget at
# start-up's figures (its profiled compute, with no correction, cold extra or margin), every this
# many in a row is served by it best effort instead: the idle estimates learn only from answers,
# and a refusal runs nothing. A lone client pausing 0.3 s at 2.2x the cheapest stitch's round
# trip got answers for 8 requests, then, the idle margin fitted to those few at its cap, a 422
# for every one of the next 92; in other runs, after a spell of CPU contention whose slowness
# the idle device factor and margin had learnt, a 422 for 61 and 70 of the 70 after it
# (bench/spell.py, session 33).
EXPLORE_AFTER = 4


@dataclass(frozen=True)
class Plan:
    """An admitted request: what runs, by when, and what the planner expected."""

    stitch: int
    budget_ms: float  # the request's budget (its own or the server's default)
    deadline: float  # monotonic s by which the server must answer (arrival + budget - network)
    spent_ms: float  # already spent when it was planned (reading and parsing the body)
    ingress_ms: float  # predicted wait behind other requests in the HTTP layer
    http_ms: float  # predicted HTTP work of its own from here: decoding, answering
    queue_ms: float  # predicted wait for the model: work due before it
    compute_ms: float  # predicted compute of the batch it will run in
    margin_ms: float  # the controller's safety margin for it, included in admission
    # ``Ingress.arrivals`` when it was planned with nothing else in the HTTP layer or the model
    # queue and no 503 in the last SHED_QUIET_S, else None: if no request arrives before its
    # answer, it was served alone, and its times teach the idle estimates a 422 is judged on.
    alone_at: int | None = None
    # Admitted below the promise: it found the server idle and no stitch met its budget with the
    # full safety margin, but the fastest did with the one a 422 is judged on. Counted apart
    # (``snnet_best_effort_total``, not ``snnet_budget_met/missed``) and said in the answer.
    best_effort: bool = False

    @property
    def predicted_ms(self) -> float:
        """Predicted server time without the margin (what ``timing.predicted_ms`` reports)."""
        return self.spent_ms + self.outside_queue_ms + self.queue_ms

    @property
    def outside_queue_ms(self) -> float:
        """Predicted time outside the model queue, from planning on: what the safety margin
        learns from."""
        return self.ingress_ms + self.http_ms + self.compute_ms


class Planner:
    """Plans requests against the live queue, controller and HTTP backlog.

    Args:
        menu: The stitches, their ranking and costs.
        scheduler: The EDF queues (read through ``Scheduler.view``) and batch cost predictions.
        controller: Load level, hull mix and safety margin.
        ingress: The HTTP layer's backlog.
        default_budget_ms: Budget of requests that give none.
        network_ms: Part of every budget reserved for time outside the server.
        baseline_policies: Accept the ``policy`` field's baselines (benchmarks).
    """

    def __init__(
        self,
        menu: StitchMenu,
        scheduler: Scheduler,
        controller: Controller,
        ingress: Ingress,
        *,
        default_budget_ms: float,
        network_ms: float = 0.0,
        baseline_policies: bool = False,
    ) -> None:
        self.menu, self.scheduler = menu, scheduler
        self.controller, self.ingress = controller, ingress
        self.default_budget_ms, self.network_ms = default_budget_ms, network_ms
        self.baseline_policies = baseline_policies
        self.last_shed = -math.inf  # when admission last refused a request with a 503
        self.near_refused = 0  # 422s in a row to lone requests start-up's figures fit

    def plan(
        self,
        opts: ClassifyOptions,
        n: int,
        now: float,
        *,
        arrived: float | None = None,
        payload_bytes: int = 0,
    ) -> Plan | Refusal:
        """The stitch for a request of ``n`` images (``payload_bytes`` of them encoded) planned at
        ``now`` (monotonic s) after arriving at ``arrived`` (default: now), or why not."""
        candidates = self._candidates(opts)
        if isinstance(candidates, Refusal):
            return candidates
        arrived = now if arrived is None else arrived
        budget = opts.latency_budget_ms or self.default_budget_ms
        server_budget = budget - self.network_ms  # ms the server may spend, from arrival
        idle = {s: self.scheduler.batches_ms(s, n) for s in candidates}
        cold = self.scheduler.cold_ms(now)  # the model idled: its next batch runs longer
        pool = self._pool(opts, candidates, idle, budget, payload_bytes, cold)
        fastest = min(pool, key=lambda s: (idle[s], s))  # of what admission may try
        at_rest = idle[fastest] / max(1.0, self._slow_down())  # not today's contention
        deadline = arrived + server_budget / 1e3
        view = self.scheduler.view(deadline, now)
        alone = not view.busy and not self.ingress.others()  # nothing else in the server
        spent = max(0.0, (now - arrived) * 1e3)
        # (a lone request that start-up's figures fit goes on: it may be served to learn, below)
        if at_rest > server_budget and not (alone and self._profiled(fastest, n) <= server_budget):
            pre = spent + self.ingress.wait_ms(payload_bytes) if alone else 0.0  # its own, if idle
            need, least = self._idle_need(at_rest, payload_bytes, cold, pre)
            return self._too_tight(budget, fastest, at_rest, need, least, n, opts, len(pool))
        if len(pool) > 1 and not alone:
            allowed = set(self.controller.draw_allowed(now))
            pool = [s for s in pool if s in allowed] or pool  # a cap below the level: its menu
        teaches = alone and now - self.last_shed >= SHED_QUIET_S
        plan = self._admit(
            pool, n, deadline, budget, spent, payload_bytes, view, cold, alone, teaches
        )
        if isinstance(plan, Plan) and alone:
            self.near_refused = 0
        if isinstance(plan, Refusal) and plan.status == 503:
            self.last_shed = now
            if alone and cold > self.scheduler.cold_at_rest_ms:
                self.scheduler.relax_cold()  # (nothing ran, nothing else would teach it)
        return plan

    # -- steps --------------------------------------------------------------------------------

    def _candidates(self, opts: ClassifyOptions) -> list[int] | Refusal:
        """The stitches the request's own fields allow, most preferred first."""
        if opts.policy not in (None, "adaptive") and not self.baseline_policies:
            return Refusal(
                422,
                f"policy={opts.policy!r} is a benchmark baseline and is off on this server "
                "(SNNET_BASELINE_POLICIES=false); allowed: adaptive, or leave policy out",
            )
        if opts.stitch_id is not None and opts.max_gflops is not None:
            return Refusal(422, "give at most one of stitch_id and max_gflops")
        if opts.stitch_id is not None:
            try:
                return [self.menu.row(opts.stitch_id).id]
            except UnknownStitch as e:
                return Refusal(422, f"{e} (GET /stitches)")
        if opts.max_gflops is not None:
            under = [s for s in self.menu.ranking if self.menu.rows[s].gflops <= opts.max_gflops]
            if not under:
                cheapest = min(r.gflops for r in self.menu.rows)
                return Refusal(
                    422,
                    f"max_gflops={opts.max_gflops:g} is below the cheapest stitch ({cheapest:.6g} "
                    f"GFLOPs); allowed: max_gflops >= {cheapest:.6g}",
                )
            return under
        return list(self.menu.ranking)

    def _pool(
        self,
        opts: ClassifyOptions,
        candidates: list[int],
        idle: dict[int, float],
        budget: float,
        payload_bytes: int,
        cold: float,
    ) -> list[int]:
        """The stitches admission may try, in order: all candidates, or one for a baseline."""
        if opts.policy == "most_accurate":
            return candidates[:1]
        if opts.policy not in ("cheapest", "static"):  # adaptive
            return candidates
        fastest = min(candidates, key=lambda s: (idle[s], s))
        if opts.policy == "cheapest":
            return [fastest]
        # static: the most accurate stitch an idle server would admit at this budget (the least
        # a 422 names), load ignored. Its compute alone, as before, chose stitches whose HTTP
        # work and margin did not fit: a 422 whose least, retried, chose a dearer stitch and got
        # a 422 again (5 of 5 retries).
        slow = max(1.0, self._slow_down())  # (as the 422's least counts it)
        fits = (
            s
            for s in candidates
            if self._idle_need(idle[s] / slow, payload_bytes, cold, full=True)[1] <= budget
        )
        return [next(fits, fastest)]

    def _admit(
        self,
        pool: list[int],
        n: int,
        deadline: float,
        budget: float,
        spent: float,
        payload_bytes: int,
        view: QueueView,
        cold: float,
        alone: bool,
        teaches: bool,
    ) -> Plan | Refusal:
        """The first stitch of ``pool`` that fits its budget behind the queue without making a
        queued request late; else a 503 that says which of the two rules refused it. ``alone``:
        nothing else in the server (queue or HTTP layer); ``teaches``: and its answer may teach
        the idle estimates (``Plan.alone_at``)."""
        server_budget = budget - self.network_ms
        # alone: what requests served alone took, not what a recent burst's did
        http = (
            self.ingress.rest_ms(payload_bytes)[1] if alone else self.ingress.own_ms(payload_bytes)
        )
        ingress = self.ingress.wait_ms(payload_bytes)

        def cost(s: int, refuse: bool = False) -> tuple[float, float, float, float, float]:
            """(compute queued before it in its stitch's queue, its batch's compute, its wait,
            margin, total) for stitch ``s`` behind the queue: its batch starts where its
            stitch's queue does."""
            before = self.scheduler.batches_ms(s, view.counts.get(s, 0))
            compute = self.scheduler.batches_ms(s, view.counts.get(s, 0) + n) + cold
            wait = view.ahead_ms - before
            margin = self.controller.pad_ms(ingress + http + compute, alone=alone, refuse=refuse)
            return before, compute, wait, margin, spent + ingress + http + compute + margin + wait

        def admitted(s: int, compute: float, wait: float, margin: float, **kw) -> Plan:
            return Plan(
                s, budget, deadline, spent, ingress, http, wait, compute, margin,
                self.ingress.arrivals if teaches else None, **kw,
            )  # fmt: skip

        fits, queue_ms = False, view.ahead_ms
        least_now = math.inf  # the least any stitch of the pool needs now, with its margin
        for s in pool:
            before, compute, queue_ms, margin, total = cost(s)
            least_now = min(least_now, total)
            if total > server_budget + ROUNDING_MS:
                continue
            fits = True
            if compute - before <= view.later_slack_ms - margin:
                return admitted(s, compute, queue_ms, margin)
        if not fits and alone:
            # Nothing ahead of it, and no stitch meets the budget with an idle server's full
            # margin. The fastest still serves it if it does with the margin at refuse_quantile
            # (95%; lower for SNNET_SLO_TARGET under 0.95): an idle server meets such a budget
            # most times, a refusal never (a fresh idle DeiT server here refused budgets of
            # 59-102 ms while its cheapest stitch answered in 38-50 ms).
            s = min(pool, key=lambda s: (self.scheduler.batches_ms(s, n), s))
            _, compute, queue_ms, margin, least_now = cost(s, refuse=True)
            if least_now <= server_budget + ROUNDING_MS:
                return admitted(s, compute, queue_ms, margin, best_effort=True)
            # If the budget is below what the fastest stitch needs on this server even when
            # idle (its compute plus HTTP work and that margin), waiting would not help: say
            # what would do. If it only missed because of the moment (time gone in a busy
            # event loop before planning, or the device running slower than an idle server's,
            # as under CPU contention from a burst), that is load: 503.
            slow = self._slow_down()
            fastest = self.scheduler.batches_ms(s, n) / max(1.0, slow)
            need, least = self._idle_need(fastest, payload_bytes, cold, spent + ingress)
            profiled = spent + ingress + http + self._profiled(s, n)
            if need > server_budget and profiled <= server_budget:
                # It would fit as the server was at start-up: refused for what the last idle
                # answers taught, which only answers can unteach (EXPLORE_AFTER).
                self.near_refused += 1
                if self.near_refused >= EXPLORE_AFTER:
                    return admitted(s, compute, queue_ms, margin, best_effort=True)
            if need > server_budget:
                return Refusal(
                    422,
                    f"latency_budget_ms={budget:g} is below what this request needs on this "
                    f"server even when idle ({need + self.network_ms:.2f} ms: compute, reading, "
                    f"decoding and answering its images (sized {payload_bytes} bytes: their "
                    f"bytes, or half a byte a pixel where that is more) and the safety margin "
                    f"fitted to {self._refuse_share()} of an idle server's answers, "
                    f"{self._rest_margin_text()}"
                    f"{self._network_text()}){self._after_pause(need, least)}; allowed: "
                    f"latency_budget_ms >= {least:.2f}",
                    least_ms=least,
                )
            # What makes now dearer than an idle server, each named where it adds 0.5 ms or
            # more (a reason that adds nothing only misleads).
            why = []
            pre = self.ingress.rest_ms(payload_bytes)[0]
            if spent + ingress - pre >= 0.5:
                why.append(
                    f"{spent + ingress:.1f} ms went by reading and parsing it (and in the event "
                    f"loop's delays) before it was planned, "
                    + (
                        f"{pre:.1f} ms on an idle server"
                        if self.ingress.rest_known
                        else "where this new server has no idle figure for that yet (it learns "
                        f"one from its first {REST_MIN} requests served alone)"
                    )
                )
            if slow > 1.0 and fastest * (slow - 1.0) >= 0.5:
                why.append(f"the device runs {slow:.2f}x slower than when idle just now")
            if cold - self.scheduler.cold_at_rest_ms >= 0.5:
                why.append(
                    f"batches after a pause take {cold:.1f} ms over their prediction just now, "
                    f"{self.scheduler.cold_at_rest_ms:.1f} ms on a quiet machine"
                )
            if not why and least_now - margin <= server_budget + ROUNDING_MS:
                # Nothing of 0.5 ms makes now dearer than an idle server, and the fastest stitch
                # fits the budget without the margin: more likely met than not, and refusing
                # protects nobody at an idle server. Best effort, not a 503 (at budgets near the
                # fastest stitch's, a sequential client at an idle server was sent away 5% of
                # the time for tenths of a ms: bench/RESULTS.md "Session 32").
                return admitted(s, compute, queue_ms, margin, best_effort=True)
            # Both as budgets (with the network's share), comparable with the one given. The
            # one for now counts the time this request lost before planning: enough, if more
            # than a retry may need.
            idle_budget = need + self.network_ms
            now_budget = self._as_budget(least_now)
            return Refusal(
                503,
                f"not just now: latency_budget_ms={budget:g} would do on an idle server (it "
                f"needs {idle_budget:.1f} ms there), but at this moment it needs {now_budget:.1f} ms "
                f"({'; '.join(why) or 'small delays now, none of them 0.5 ms'}); retry later, "
                f"or with latency_budget_ms >= "
                f"{now_budget:.2f}",
                1,
                least_ms=now_budget,
                shed="slow_now",
            )
        retry = max(1, math.ceil((ingress + queue_ms) / 1e3))
        if fits:
            return Refusal(
                503,
                f"overloaded: a stitch could answer within latency_budget_ms={budget:g}, but only "
                "by making queued requests miss their deadlines; retry later",
                retry,
            )
        # The least any stitch needs now (the queue, its HTTP work, compute and margin), as a
        # budget: "predicted wait 1 ms" against a 25 ms budget read as a contradiction.
        wait = f"predicted wait {ingress + queue_ms:.0f} ms"
        if not math.isfinite(least_now):  # (an empty pool: nothing to name)
            return Refusal(503, f"overloaded: {wait}; retry later", retry)
        now_budget = self._as_budget(least_now)
        return Refusal(
            503,
            f"overloaded: no stitch can answer within latency_budget_ms={budget:g} behind the "
            f"current queue ({wait}; with reading, decoding and answering it, compute and safety "
            f"margin it needs at "
            f"least {now_budget:.2f} ms now); retry later, or with latency_budget_ms >= "
            f"{now_budget:.2f}",
            retry,
            least_ms=now_budget,
        )

    def _profiled(self, stitch: int, n: int) -> float:
        """The compute of ``n`` images of ``stitch`` at start-up's figures: its profile, with
        none of the corrections learnt since."""
        return self.scheduler.batches_ms(stitch, n) / self.scheduler.latency.correction(stitch)

    def _as_budget(self, ms: float) -> float:
        """``ms`` of server time as a client's budget: with the network's share, rounded up to
        the hundredth a message prints (a budget given as printed is enough)."""
        return math.ceil(round((ms + self.network_ms) * 100, 6)) / 100

    def _slow_down(self) -> float:
        """How much slower than when idle the device runs now, as the controller has seen it
        (above 1 under CPU contention; it returns to 1 when idle; see
        ``Controller.settled_device_factor``)."""
        return self.controller.device_factor / self.controller.settled_device_factor

    def _idle_need(
        self,
        rest_ms: float,
        payload_bytes: int,
        cold: float,
        pre_ms: float = 0.0,
        *,
        full: bool = False,
    ) -> tuple[float, float]:
        """(ms, least budget) for a request of ``payload_bytes`` whose fastest stitch computes in
        ``rest_ms`` at rest.

        The need, what decides a 422, is what it takes on this server when idle, learnt from
        requests served alone: reading and parsing it (with the event loop's lag then), its own
        HTTP work and its compute (plus ``cold`` ms, up to a quiet machine's), with an
        idle server's safety margin on those two: the one at REFUSE_QUANTILE (``full``: the
        one at MARGIN_QUANTILE, what a stitch other than the fastest is admitted with when
        idle; see ``Controller.pad_ms``). A burst's contention, busy event loop and
        misses raise what admission predicts, not this: that is load (503), not a budget no
        idle server could meet (422).

        The least budget is what admission would ask of a retry that finds the server idle,
        after a pause (a client retries after reading the refusal), so that it is admitted:
        its compute at an idle server's speed (``Controller.settled_device_factor``: a device
        running slower under contention is load and left out, as the factor returns to the idle
        one by itself while requests are refused, see ``Controller.idle_relax_s``; one running
        faster is counted at the idle one too) and with the extra batches after a pause have
        shown lately, whatever ``cold`` is now (the learnt extra only moves when batches run;
        it is over the corrected prediction, which for a client that always pauses holds most
        of the slowness itself); a reading, with the loop's lag, as slow as the 90th percentile
        of those served alone (``Ingress.rest_pre_high_ms``) or as this request's own
        (``pre_ms``, given if it found the server idle); the margin on all of it (admission
        pads the lag, which is part of the reading here); plus the network's share."""
        pre, own = self.ingress.rest_ms(payload_bytes)
        rest_cold = self.scheduler.cold_at_rest_ms

        def pad(ms: float) -> float:
            return self.controller.pad_ms(ms, alone=True, refuse=not full)

        c = rest_ms + min(cold, rest_cold)
        need = pre + own + c + pad(own + c)
        # Each part of the least below what admission then counted had retries of it refused,
        # and none served to teach the server better (one client here, 30 retries 0.3 s apart):
        # the cold batch of a 422 named while the model ran warm (29 refused 422), start-up's
        # cold extra below a learnt one (every one 503), a fresh server's prior for the
        # reading (30 of 30 503), small delays of a few tenths of a ms (11 in a row 503), the
        # lone client's device factor counted as contention (7 in a row 503).
        c = rest_ms + self.scheduler.cold_planning_ms
        c /= min(1.0, self._slow_down())  # at the idle speed, if running faster now
        read = max(self.ingress.rest_pre_high_ms(payload_bytes), pre_ms)
        least = read + own + c + pad(read + own + c) + self.network_ms
        return need, math.ceil(round(least * 100, 6)) / 100  # (ROUNDING_MS)

    def _after_pause(self, need: float, least: float) -> str:
        """Why the least budget is above the need, where that is the cold batch of a retry (a
        least 2.7x the need, unexplained, read as a wrong figure)."""
        extra = self.scheduler.cold_planning_ms
        if extra <= 0.0 or least - self.network_ms - need < 0.5:
            return ""
        return (
            f", and more after a pause, as a retry comes: the model's first batch after idling "
            f"has taken {extra:.1f} ms over its prediction here"
        )

    def _network_text(self) -> str:
        """The network's share in a 422's need, where there is one (a need below the least it
        names, with no word of the difference, read as a contradiction)."""
        return f", with the {self.network_ms:g} ms of SNNET_NETWORK_MS" if self.network_ms else ""

    def _refuse_share(self) -> str:
        """The share of idle answers a 422's margin covers, in words ("95%")."""
        return f"{100 * self.controller.refuse_quantile:g}%"

    def _rest_margin_text(self) -> str:
        """The margin a 422 is judged on (``Controller.refuse_margin``), in words."""
        c = self.controller
        share, fixed = f"{100 * c.refuse_margin:.0f}%", f"{c.refuse_margin_ms:.1f} ms"
        if c.refuse_margin <= 0:
            return fixed
        return f"{share} + {fixed}" if c.refuse_margin_ms > 0 else share

    def _too_tight(
        self,
        budget: float,
        fastest: int,
        fastest_ms: float,
        need: float,
        least: float,
        n: int,
        opts: ClassifyOptions,
        allowed: int,
    ) -> Refusal:
        reserved = (
            f" plus the {self.network_ms:g} ms reserved for the network (SNNET_NETWORK_MS)"
            if self.network_ms
            else ""
        )
        given = opts.latency_budget_ms is not None
        what = f"latency_budget_ms={budget:g}" if given else f"SNNET_DEFAULT_BUDGET_MS={budget:g}"
        below = (  # (stitch_id, or a baseline policy: the one stitch it allows)
            f"the fastest stitch's compute time ({fastest_ms:.2f} ms for stitch {fastest} at "
            f"batch {n})"
            if allowed > 1
            else f"the compute time of stitch {fastest}, the one it allows ({fastest_ms:.2f} ms "
            f"at batch {n})"
        )
        return Refusal(
            422,
            f"{what} is below {below}{reserved} even on an idle server, and it needs "
            f"{need + self.network_ms:.2f} ms in all with reading, decoding and answering it and "
            f"the safety margin{self._after_pause(need, least)}; "
            f"allowed: latency_budget_ms >= {least:.2f}",
            least_ms=least,
        )
