"""Controller: a periodic loop that turns the service's metrics into what the scheduler uses.

Every ``period`` it reads the service's own Prometheus metrics (the counters and histograms in
``server/metrics.py``: arrivals, images, compute time observed vs profiled per stitch, budgets,
met / missed / shed) and the scheduler's predicted queue wait, and updates:

- **latency corrections**: one device-wide factor times a factor per stitch. Each period, the
  observed / predicted compute of every batch run moves the device factor, with a weight that
  grows with the seconds of compute seen (``correction_evidence_s``): when the whole device slows
  down (a co-tenant, thermal limits) every stitch's prediction follows within a few batches,
  including stitches not run since. Each stitch's own factor (how it runs relative to the device
  level) learns more slowly (``stitch_evidence_s``); the stitch factors of the stitches seen
  here are kept at a geometric mean of 1, so the device factor is the common level.
  Start-up calibration sets the first device factor (``server.engine``);
- **arrival rate** (requests/s and images/s), smoothed, quick to rise and slower to fall;
- **load level** L in [0, 1]: how far down the cost range budget-chosen requests must go. It is
  the larger of two terms: a feed-forward one (the arrival rate times each stitch's per-image
  compute must keep the model busy at most ``target_utilisation`` of the time) and a feedback one
  (the queued work, not counting the batch in flight: from a quarter to three quarters of the
  mean budget, 0 to 1). L rises at once and falls at most
  ``release_per_s`` per second, so it does not flap. Stitches whose per-image cost is above
  ``max - L * (max - min)`` are left out of budget-driven choices;
- **safety margin**: what the planner adds to what it predicts outside the model queue (HTTP
  backlog, the request's own HTTP work, compute), so that what the latency model does not see
  (contention, scheduler stalls, an estimated stitch running over its estimate) is still
  budgeted for: a share of the prediction plus fixed ms, set to cover ``margin_quantile`` of the
  answered requests of the last 30 s (at most 256; 99.5% for the default promise of 99%; a
  prior and fits to a few answers until there are 20), see ``_margin``. Both parts, because
  both kinds of error occur: a stitch's own prediction error grows with it, while on a small
  VM a stall of the scheduler costs about the same 10-20 ms whatever runs.

Between steps, the planner draws a surge-time request's menu with ``draw_allowed``, which does
two more things: it takes the rate of the last few arrivals, so that a burst narrows the choices
before the next step sees it, and it meets the level's cost cap on average by alternating
between the two stitches of the accuracy/cost hull around the cap (error diffusion), which is
more accurate at the same mean cost than the best single stitch under the cap. The planner draws
only while the server is busy: a request that finds the model idle and nobody ahead of it gets
the most accurate stitch its budget allows, whatever the arrival rate (a sequential client's
rate rises exactly because it is answered fast).

With ``SNNET_PROMETHEUS_URL`` set it also queries a Prometheus server for the same figures
across all replicas: the fleet's per-replica arrival rate acts as a floor under the local
estimate, and the fleet's corrections, relative to their median, stand in for the stitch factors
of stitches this replica has not run yet (the fleet gives the shape, this device the level).
Prometheus being slow or down never stops the local loop; the error is shown in the state.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .latency import MAX_CORRECTION, MIN_CORRECTION, LatencyModel
from .schemas import SLO_RANGE, SLO_TARGET

log = logging.getLogger("snnet.controller")


@dataclass
class Reading:
    """One sample of the figures the controller works from (counters are running totals)."""

    t: float  # monotonic seconds
    arrivals: float = 0.0
    images: float = 0.0
    budget_sum_s: float = 0.0  # sum and count of request budgets (histogram)
    budget_count: float = 0.0
    queued_work_ms: float = 0.0  # predicted compute of the work waiting (not the batch running)
    observed_s: dict[int, float] = field(default_factory=dict)  # compute seconds, by stitch
    profiled_s: dict[int, float] = field(default_factory=dict)  # profile's seconds, same batches


@dataclass
class Fleet:
    """Figures across all replicas, from a Prometheus server."""

    arrival_rate: float | None = None  # requests/s, all replicas
    replicas: int | None = None  # ready replicas
    attainment: float | None = None  # met / (met + missed + shed)
    corrections: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    updated: float | None = None  # monotonic time of the last successful query


class PrometheusSource:
    """Instant queries against a Prometheus server's HTTP API (``/api/v1/query``)."""

    WINDOW = "1m"

    def __init__(self, url: str, timeout_s: float = 2.0, selector: str = "") -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s
        self.selector = selector  # label matchers on every metric (SNNET_PROMETHEUS_SELECTOR)

    def _m(self, name: str) -> str:
        """A metric name with the selector's matchers."""
        return f"{name}{{{self.selector}}}" if self.selector else name

    def query(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) per series; raises RuntimeError with Prometheus's message on failure."""
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(
                f"{self.url}/api/v1/query?{q}", timeout=self.timeout_s
            ) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                detail = json.loads(e.read()).get("error", "")
            except Exception:
                detail = ""
            raise RuntimeError(f"Prometheus answered {e.code} for {expr!r}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RuntimeError(f"Prometheus at {self.url} unreachable: {e}") from None
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expr!r} failed: {body.get('error')}")
        out = []
        for series in body["data"]["result"]:
            value = float(series["value"][1])
            if math.isfinite(value):
                out.append((series["metric"], value))
        return out

    def scalar(self, expr: str) -> float | None:
        rows = self.query(expr)
        return rows[0][1] if rows else None

    def fleet(self) -> Fleet:
        w = self.WINDOW
        m = self._m
        met, missed, shed = (
            f"sum(rate({m(f'snnet_{n}_total')}[{w}]))"
            for n in ("budget_met", "budget_missed", "shed")
        )
        corrections = {
            int(labels["stitch"]): value
            for labels, value in self.query(
                f"sum by (stitch) (rate({m('snnet_compute_seconds_sum')}[{w}])) / "
                f"sum by (stitch) (rate({m('snnet_compute_profiled_seconds_total')}[{w}]))"
            )
            if labels.get("stitch", "").isdigit()
        }
        replicas = self.scalar(f"sum({m('snnet_ready')})")
        return Fleet(
            arrival_rate=self.scalar(f"sum(rate({m('snnet_arrivals_total')}[{w}]))"),
            replicas=None if replicas is None else int(replicas),
            attainment=self.scalar(f"{met} / ({met} + {missed} + {shed})"),
            corrections=corrections,
            updated=time.monotonic(),
        )


MARGIN_MIN_ANSWERS = 20
# The share of answers the margin aims to cover, for the default promise (see
# ``margin_quantile``). The promise is 99% within budget: a margin at exactly the 99th
# percentile of recent answers misses about 1% of what it is meant to cover before any
# estimation error, and the window's own 99th percentile (its 3rd largest of 200) sat below the
# true one often enough that idle DeiT runs here met 98.1-98.8% (session 11).
MARGIN_QUANTILE = 0.995
# The share of idle answers the margin a 422 is judged on aims to cover
# (``Controller.refuse_margin``): a budget the fastest stitch meets with it on an idle server
# is served by it ("best effort", counted apart), not refused. On a 2-core VM a lone forward
# runs up to 1.5-2x its prediction now and then, so at MARGIN_QUANTILE a fresh idle DeiT server
# refused budgets of 59-102 ms while its cheapest stitch answered in 38-50 ms (session 28,
# bench/data/deit_idle_rows/run5.jsonl). Fitted at 95%, it covered 94.5% of the next answer on
# the recorded idle DeiT runs from the 5th answer on (91.7-98.2% per run;
# tests/data/deit_idle_answers.json); fitted at 90%, 88.4% from the 20th (83.8-92.0% per run).
REFUSE_QUANTILE = 0.95
# The upper tail that MARGIN_QUANTILE is extrapolated from (see _tail_quantile), and the least
# number of answers in it.
MARGIN_TAIL = 0.1
MARGIN_TAIL_MIN = 5
MAX_MARGIN = 0.5
# Until there are enough answers to measure it: the first requests of a fresh process run cold
# paths (a DeiT net here missed 5 of its first 10 budgets by 5-30% with no margin).
MARGIN_PRIOR = 0.2
# From this many answers on, a spread wider than the prior raises the margin before there are
# MARGIN_MIN_ANSWERS (see _margin).
MARGIN_MIN_FIT = 5
# The fixed parts the margin tries (see _margin), in multiples of the window's median prediction;
# inf: a fixed part only.
MARGIN_SCALES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, math.inf)
# An estimated stitch's first run moves its own factor at least this far to what it showed.
FIRST_RUN_WEIGHT = 0.7
# Estimated stitches not run yet are predicted with the largest overrun of this many last first
# runs of estimated stitches, at most MAX_ESTIMATE_PAD: on a DeiT-Ti/S/B net here, first runs
# of estimated stitches took 0.84-1.44x their estimates.
FIRST_RUNS_KEPT = 8
MAX_ESTIMATE_PAD = 1.5


def margin_quantile(slo_target: float) -> float:
    """The share of answers the margin aims to cover for a promise of ``slo_target`` within
    budget: half the misses the promise allows (0.995 for 0.99, 0.975 for 0.95), the other half
    left to estimation error (the margin is fitted to the last answers, not the next ones; on
    the recorded idle DeiT answers, ``bench/law_replay.py``, a margin fitted at 99.5% covered
    96.8-99.3% of the next answers from the 5th on, at 97.5% 94.6-98.0%, at 95% 90.7-96.7%)."""
    lo, hi = SLO_RANGE
    if not lo <= slo_target <= hi:
        raise ValueError(f"slo_target must be in [{lo}, {hi}], got {slo_target}")
    return 1.0 - (1.0 - slo_target) / 2.0


def refuse_quantile(quantile: float) -> float:
    """The share of idle answers the margin a 422 is judged on covers, for a margin at
    ``quantile``: REFUSE_QUANTILE, or lower for a lower promise so that a band of budgets is
    still served best effort (0.9 for a margin at 0.95), never below what the tail fit allows
    (1 - MARGIN_TAIL; at a promise of 0.8 the two margins coincide: no best-effort band)."""
    return max(1.0 - MARGIN_TAIL, min(REFUSE_QUANTILE, 2.0 * quantile - 1.0))


def _prior(quantile: float) -> float:
    """MARGIN_PRIOR scaled from MARGIN_QUANTILE to ``quantile`` as a normal's quantile is."""
    normal = statistics.NormalDist()
    return MARGIN_PRIOR * normal.inv_cdf(quantile) / normal.inv_cdf(MARGIN_QUANTILE)


def _t_quantile(df: int, quantile: float = MARGIN_QUANTILE) -> float:
    """Student's t at ``quantile`` with ``df`` degrees of freedom (Cornish-Fisher: 4.36 for
    the exact 4.60 at df=4, 3.23 for 3.25 at df=9, at 0.995)."""
    z = statistics.NormalDist().inv_cdf(quantile)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def _tail_quantile(values: list[float], quantile: float = MARGIN_QUANTILE) -> float:
    """The ``quantile`` quantile of sorted ``values``, from an exponential tail fitted to the
    largest MARGIN_TAIL of them (peaks over threshold: the mean excess over the threshold is the
    tail's scale). It uses a few dozen answers where the empirical quantile of a window of 200
    rests on its largest two, and it extrapolates: the target lies beyond the window's own
    99th percentile."""
    n = len(values)
    assert n > MARGIN_TAIL_MIN, n
    k = min(n - 1, max(MARGIN_TAIL_MIN, math.ceil(MARGIN_TAIL * n)))
    threshold = values[n - k - 1]
    scale = statistics.fmean(v - threshold for v in values[n - k :])
    # The predictive quantile: the scale is itself estimated from k excesses, so the chance
    # of exceeding threshold + scale * t is (1 + t / k) ** -k, not exp(-t).
    assert quantile >= 1.0 - MARGIN_TAIL, quantile  # (below: the threshold itself)
    tail = (1.0 - quantile) / (k / n)
    return threshold + scale * k * (tail ** (-1.0 / k) - 1.0)


def _margin(
    pairs: list[tuple[float, float]], quantiles: Sequence[float] = (MARGIN_QUANTILE,)
) -> list[tuple[float, float]]:
    """How far past its prediction an answer may run: (share of the prediction, fixed ms), from
    (actual, predicted) ms of recent answers, one pair per quantile of ``quantiles`` (the share
    of answers to cover: MARGIN_QUANTILE; REFUSE_QUANTILE for the margin a 422 is judged on).
    The padded prediction of ``p`` is ``p * (1 + share) + ms``. Every quantile is fitted with
    the same fixed scale ``c`` (below), so a lower quantile's pad is never larger, at any ``p``.

    Why two parts: on a 2-core VM the overruns are mostly stalls of about the same size
    whatever the prediction (idle DeiT net here, 2,173 answers: the 99th percentile of actual -
    predicted was 13-23 ms from 20 ms predictions to 300 ms ones, i.e. 1.74x the small ones and
    1.18x the large ones), while a stitch's own prediction error grows with it. A share alone
    pads large predictions by far more than they need and small ones too little.

    How: the overruns are normalised as ``(actual - predicted) / (predicted + c)`` for a few
    fixed parts ``c`` (MARGIN_SCALES times the median prediction; ``inf``: plain ms). The right
    ``c`` makes the answers with predictions below the median and those above it look alike,
    so the ``c`` whose two halves have the closest MARGIN_QUANTILE tails (``_tail_quantile``)
    is taken (from MARGIN_MIN_ANSWERS answers), and the share is the MARGIN_QUANTILE tail of
    all the answers so normalised: the pad of ``p`` is ``share * (p + c)``. (Until session 26
    ``c`` was the median prediction up to 40 answers: a fresh DeiT server whose first answers
    ran over in proportion to their predictions padded its cheapest stitch, 40 ms, by 30-52 ms
    from the 20th answer to the 40th and refused budgets 1.5-2x what it took; the recorded runs
    of ``bench/margin_replay.py`` lost no coverage choosing from 20: answers 20-39, 99.4% ->
    100%, cheap pads 15.2 -> 14.8 ms.)

    With fewer than MARGIN_MIN_FIT answers: a share only, the prior scaled to the first of
    ``quantiles`` (the margin's own); the others get the same, at most MARGIN_PRIOR (so a
    fresh server's 422s are judged as before whatever the promise).
    Then, below MARGIN_MIN_ANSWERS, ``c`` is the geometric mean of the smallest and the median
    prediction, and the share is the prior (scaled to the quantile as a normal one is) or,
    when wider, the upper prediction bound at the quantile of a log-normal fitted to
    ``(actual + c) / (predicted + c)`` (Student's t): a fresh server's first answers are its
    least steady, and on the recorded idle DeiT runs a share alone covered 98.1% of the first
    20 of each, this 99.4% (``bench/margin_replay.py``). Until session 29 ``c`` was the median
    prediction: a client whose first budgets were large had dear stitches answer first, and
    the cheapest stitch's pad then held half their prediction, 50% + 95 ms on a 40 ms one. The
    smallest prediction fits overruns in proportion to the prediction but under-covers stalls
    of fixed size (two 40 ms answers among ten of 200 ms, overruns p * e^N(0, 0.03) + Exp(6 ms):
    93.6% of the 40 ms stitch's covered at MARGIN_QUANTILE, 83.2% at REFUSE_QUANTILE); the
    median over-covers them (100%, 99.4%); the geometric mean 98.6% and 93.7%, and on the
    recorded traces of sessions 27-29 (``bench/law_replay.py`` on run1-7, answers 5-19) the
    cheapest stitch's least budget a 422 names is 59.0 ms (median: 64.8; smallest: 56.3).

    The share is at most MAX_MARGIN and the fixed part MAX_MARGIN times the median prediction
    (so the pad of the median prediction is at most the prediction itself, whatever ``c``),
    so that a few stalls (a GC pause, a burst) cannot make the margin shed everything."""
    n = len(pairs)
    if n < MARGIN_MIN_FIT:  # (all: the first answers are the least steady)
        first = _prior(quantiles[0])
        return [(first, 0.0)] + [(min(first, MARGIN_PRIOR), 0.0)] * (len(quantiles) - 1)
    pairs = sorted(pairs, key=lambda ap: ap[1])
    median = pairs[n // 2][1]
    if n < MARGIN_MIN_ANSWERS:  # a share of the prediction and as much of c
        c = math.sqrt(pairs[0][1] * median)
        logs = [math.log(max((a + c) / (p + c), 1e-6)) for a, p in pairs]
        mean, sd = statistics.fmean(logs), statistics.stdev(logs) * math.sqrt(1 + 1 / n)
        out = []
        for q in quantiles:
            share = min(MAX_MARGIN, max(_prior(q), math.exp(mean + _t_quantile(n - 1, q) * sd) - 1))
            out.append((share, share * c))
        return out
    lower, upper = pairs[: n // 2], pairs[n // 2 :]

    def overruns(c: float, part: list[tuple[float, float]]) -> list[float]:
        # relative to the prediction plus c; c = inf: in ms
        if math.isinf(c):
            return sorted(a - p for a, p in part)
        return sorted((a - p) / (p + c) for a, p in part)

    def mismatch(c: float) -> float:
        lo = _tail_quantile(overruns(c, lower), quantiles[0])
        hi = _tail_quantile(overruns(c, upper), quantiles[0])
        return abs(hi - lo) / max(abs(hi), abs(lo), 1e-9)

    c = min((scale * median for scale in MARGIN_SCALES), key=mismatch)
    normalised = overruns(c, pairs)
    out = []
    for q in quantiles:
        z = _tail_quantile(normalised, q)
        if math.isinf(c):  # past the fixed part's cap, the rest as a share (the same total cap)
            fixed = min(MAX_MARGIN * median, max(0.0, z))
            out.append((min(MAX_MARGIN, max(0.0, z - fixed) / median), fixed))
        else:
            share = min(MAX_MARGIN, max(0.0, z))
            out.append((share, min(MAX_MARGIN * median, share * c)))
    return out


def _clamp(factor: float) -> float:
    return min(max(factor, MIN_CORRECTION), MAX_CORRECTION)


def _ewma(old: float, new: float, dt: float, tau: float) -> float:
    a = 1.0 - math.exp(-dt / tau) if tau > 0 else 1.0
    return old + a * (new - old)


class Controller:
    """The control law; ``update`` is a pure step from one reading to the next state.

    Args:
        latency: The latency model whose corrections this controller owns.
        ranking: Stitch ids, most preferred first.
        max_batch: The batcher's largest batch (per-image costs are taken at the batch size
            requests arrive in, up to this).
        target_utilisation: Share of time the model may be busy at the current arrival rate.
        release_per_s: Fastest fall of the load level, per second.
        rate_tau_up_s, rate_tau_down_s: Smoothing of the arrival rate when it rises / falls.
        correction_evidence_s: Seconds of compute that move the device factor 63% of the way.
        stitch_evidence_s: Seconds of a stitch's compute that move its own factor 63% of the way.
        device_factor: The first device factor (start-up calibration: measured / profiled).
        residual_window: Most answered requests kept for the safety margin.
        residual_max_age_s: Answers older than this no longer count in the margin of a busy
            server (a past burst's misses should not pad predictions for ever). Those of
            requests served alone do not age: only newer ones replace them (see
            ``_update_margin``), unless other work on the machine slowed them.
        recent_arrivals: How many of the last arrivals ``draw_allowed`` takes the rate of.
        scores: Each stitch's accuracy (what ``ranking`` sorts by). With them, ``draw_allowed``
            meets a cost cap on average by mixing the two stitches of the accuracy/cost hull
            around it, instead of giving every request the best stitch under the cap.
        estimated: Stitches whose profiled times are estimates (not measured at start-up).
            Their first run here sets most of their own factor, and until it, they are
            predicted with the largest overrun of the last estimated stitches' first runs
            (``estimate_pad``): an estimate that was low sends its first request over budget.
        slo_target: The share of answered requests the server promises within their budget;
            the margins cover ``margin_quantile(slo_target)`` of the answers (the one a 422 is
            judged on, ``refuse_quantile`` of that). A lower promise pads less, so more
            accurate stitches fit a budget, and more answers run over it.
    """

    def __init__(
        self,
        latency: LatencyModel,
        ranking: Sequence[int],
        *,
        max_batch: int,
        target_utilisation: float = 0.8,
        release_per_s: float = 0.5,
        rate_tau_up_s: float = 0.3,
        rate_tau_down_s: float = 1.0,
        correction_evidence_s: float = 0.2,
        stitch_evidence_s: float = 1.0,
        device_factor: float = 1.0,
        idle_relax_s: float = 2.0,
        residual_window: int = 256,
        residual_max_age_s: float = 30.0,
        recent_arrivals: int = 12,
        scores: Mapping[int, float] | None = None,
        estimated: Collection[int] = (),
        slo_target: float = SLO_TARGET,
    ) -> None:
        if not 0 < target_utilisation <= 1:
            raise ValueError(f"target_utilisation must be in (0, 1], got {target_utilisation}")
        self.slo_target = slo_target
        self.quantile = margin_quantile(slo_target)
        self.refuse_quantile = refuse_quantile(self.quantile)
        prior = _prior(self.quantile)
        self.latency, self.ranking, self.max_batch = latency, list(ranking), max_batch
        self.target_utilisation, self.release_per_s = target_utilisation, release_per_s
        self.rate_tau_up_s, self.rate_tau_down_s = rate_tau_up_s, rate_tau_down_s
        self.correction_evidence_s = correction_evidence_s
        self.stitch_evidence_s = stitch_evidence_s
        self.device_factor = _clamp(device_factor)
        # The device factor of an idle server: start-up's, then what periods whose answers
        # were all served alone showed (a lone client's requests ran 1.24-1.30x start-up's
        # calibration in one run on the 2-core VM, 0.79-1.04x in another, and 503s to it said
        # the device ran slower "just now"). What "slower than when idle" compares with; and
        # while requests arrive and nothing runs, the device factor returns to it with the time
        # constant idle_relax_s: a slow-down seen under a burst (CPU contention) is evidence
        # about that moment, and a server that refuses every request as too slow would gather
        # no other.
        self.settled_device_factor, self.idle_relax_s = self.device_factor, idle_relax_s
        self._answers = [0, 0]  # answered since the last step: all, and those served alone
        self._stitch_factor: dict[int, float] = {}  # stitch -> its time relative to the device
        self._seen: set[int] = set()  # stitches run here
        self._estimated = frozenset(estimated)
        # observed / predicted of the last estimated stitches' first runs
        self._first_runs: deque[float] = deque(maxlen=FIRST_RUNS_KEPT)
        self.estimate_pad = 1.0
        self._apply_corrections()
        self.level = 0.0
        self.level_rate = self.level_queue = 0.0
        self.arrival_rate = 0.0  # requests/s
        self.image_rate = 0.0  # images/s
        self.images_per_request = 1.0
        self.mean_budget_ms: float | None = None
        self.queued_work_ms = 0.0
        # The safety margin on the predicted time outside the queue: a share of it plus fixed ms.
        self.margin, self.margin_ms = prior, 0.0
        self.allowed: list[int] = list(self.ranking)
        self.scores = dict(scores) if scores is not None else None
        self._credit = 0.0  # error diffusion between the two hull stitches, see draw_allowed
        self._refresh_costs()
        # The last arrivals (time, images), for the request path's burst check.
        self._recent: deque[tuple[float, int]] = deque(maxlen=recent_arrivals)
        self.fleet: Fleet | None = None
        self.updates = 0
        self._prev: Reading | None = None
        # (time, actual ms, predicted ms) of answered requests
        self._residuals: deque[tuple[float, float, float]] = deque(maxlen=residual_window)
        # Those of requests served alone (an idle server's): the margin a 422 ("too tight even
        # when idle") and an idle request's plan count, so a burst's misses never make a budget
        # look impossible. Same window, but kept until newer ones replace them, whatever their
        # age; with too few (a fresh server), the prior.
        self._rest_residuals: deque[tuple[float, float, float]] = deque(maxlen=residual_window)
        # Those of requests served alone that a busy machine slowed (their forward waited for a
        # CPU): fitted with the others, but they age as a busy server's, and in a window of
        # their own, so a long spell cannot push the quiet machine's answers out.
        self._rest_contended: deque[tuple[float, float, float]] = deque(maxlen=residual_window)
        self.rest_margin, self.rest_margin_ms = prior, 0.0
        # The same at ``refuse_quantile``: what a 422 is judged on (see ``pad_ms``).
        self.refuse_margin, self.refuse_margin_ms = min(prior, MARGIN_PRIOR), 0.0
        self._margin_key: tuple | None = None  # the windows the margins were fitted to
        self.residual_max_age_s = residual_max_age_s
        self._lock = threading.Lock()  # residuals come from the event loop, reads from anywhere

    # -- inputs -------------------------------------------------------------------------------

    def observe_residual(
        self,
        actual_ms: float,
        predicted_ms: float,
        *,
        alone: bool = False,
        contended: bool = False,
    ) -> None:
        """One answered request's time outside the model queue, measured and as predicted
        (HTTP backlog, its own HTTP work and compute; see ``Engine.record_answer``); ``alone``
        if it was served alone (``Ingress``); ``contended`` if other work on the machine made
        it wait for a CPU (``server.cpuwait``): an idle server's answer then, but not an idle
        machine's. It counts in the idle margin only until it ages (a co-tenant's spell
        passes; a machine busy for good keeps giving such answers), and its period is no
        evidence of the idle device factor."""
        if predicted_ms > 0 and math.isfinite(actual_ms) and math.isfinite(predicted_ms):
            with self._lock:
                self._residuals.append((time.monotonic(), actual_ms, predicted_ms))
                self._answers[0] += 1
                if alone and contended:
                    self._rest_contended.append(self._residuals[-1])
                elif alone:
                    self._rest_residuals.append(self._residuals[-1])
                    self._answers[1] += 1

    # -- the step -----------------------------------------------------------------------------

    def per_image_ms(self, stitch: int) -> float:
        b = min(self.max_batch, max(1, round(self.images_per_request)))
        return self.latency.predict_ms(stitch, b) / b

    def update(self, r: Reading) -> None:
        prev, self._prev = self._prev, r
        self.updates += 1
        self.queued_work_ms = r.queued_work_ms
        if prev is None or r.t <= prev.t:
            self._refresh_costs()
            self._set_level(0.0, r.t)
            return
        dt = r.t - prev.t
        self._update_corrections(prev, r, dt)
        self._update_rates(prev, r, dt)
        self._update_margin()
        self._refresh_costs()
        self._set_level(self._target_level(), dt)

    def _update_corrections(self, prev: Reading, r: Reading, dt: float) -> None:
        seen: dict[int, tuple[float, float]] = {}  # stitch -> (observed s, profiled s) this period
        for s, profiled in r.profiled_s.items():
            d_prof = profiled - prev.profiled_s.get(s, 0.0)
            d_obs = r.observed_s.get(s, 0.0) - prev.observed_s.get(s, 0.0)
            if d_prof > 0 and d_obs > 0:
                seen[s] = (d_obs, d_prof)
        with self._lock:
            answers, self._answers = self._answers, [0, 0]
        if seen:
            # The device factor: everything run this period against what the stitch factors
            # predict for it.
            observed = sum(o for o, _ in seen.values())
            expected = sum(p * self._stitch_factor.get(s, 1.0) for s, (_, p) in seen.items())
            a = 1.0 - math.exp(-sum(p for _, p in seen.values()) / self.correction_evidence_s)
            f = self.device_factor
            self.device_factor = _clamp(f + a * (observed / expected - f))
            if answers[0] and answers[1] == answers[0]:  # an idle server's evidence
                idle = self.settled_device_factor
                self.settled_device_factor = _clamp(idle + a * (observed / expected - idle))
            for s, (o, p) in seen.items():
                b = 1.0 - math.exp(-p / self.stitch_evidence_s)
                if s in self._estimated and s not in self._seen:
                    # the estimate's error shows in its first run: learn it now (and how far
                    # estimates run over, for the stitches not run yet)
                    self._first_runs.append(o / (p * f))
                    b = max(b, FIRST_RUN_WEIGHT)
                k = self._stitch_factor.get(s, 1.0)
                self._stitch_factor[s] = k + b * (o / (p * self.device_factor) - k)
                self._seen.add(s)
            # Keep the device factor the common level: the stitch factors of the stitches run
            # here have a geometric mean of 1 (otherwise the split between the two drifts, and
            # stitches never run would inherit an arbitrary level).
            g = math.exp(statistics.fmean(math.log(self._stitch_factor[s]) for s in self._seen))
            for s in self._seen:
                self._stitch_factor[s] /= g
            self.device_factor = _clamp(self.device_factor * g)
            self.estimate_pad = min(MAX_ESTIMATE_PAD, max([1.0, *self._first_runs]))
        elif r.arrivals > prev.arrivals and self.idle_relax_s > 0:
            # Requests came and nothing ran: all refused, maybe only because of this factor.
            # (A period with no requests keeps it: a sparse client's evidence is rare but real.)
            keep = math.exp(-dt / self.idle_relax_s)
            settled = self.settled_device_factor
            self.device_factor = settled + (self.device_factor - settled) * keep
        f = self.fleet
        if f is not None and f.corrections:  # the fleet's shape for stitches never run here
            level = statistics.median(f.corrections.values())
            for s, ratio in f.corrections.items():
                if s not in self._seen and level > 0:
                    self._stitch_factor[s] = ratio / level
        self._apply_corrections()

    def _apply_corrections(self) -> None:
        for s in self.latency.corrections():
            own = self._stitch_factor.get(s, self.estimate_pad if s in self._estimated else 1.0)
            self.latency.set_correction(s, self.device_factor * own)

    def _update_rates(self, prev: Reading, r: Reading, dt: float) -> None:
        req = max(0.0, r.arrivals - prev.arrivals) / dt
        img = max(0.0, r.images - prev.images) / dt
        tau = self.rate_tau_up_s if req > self.arrival_rate else self.rate_tau_down_s
        self.arrival_rate = _ewma(self.arrival_rate, req, dt, tau)
        tau = self.rate_tau_up_s if img > self.image_rate else self.rate_tau_down_s
        self.image_rate = _ewma(self.image_rate, img, dt, tau)
        if self.arrival_rate > 0:
            self.images_per_request = max(1.0, self.image_rate / self.arrival_rate)
        d_count = r.budget_count - prev.budget_count
        if d_count > 0:
            mean = (r.budget_sum_s - prev.budget_sum_s) / d_count * 1e3
            self.mean_budget_ms = (
                mean if self.mean_budget_ms is None else _ewma(self.mean_budget_ms, mean, dt, 1.0)
            )

    def _update_margin(self) -> None:
        oldest = time.monotonic() - self.residual_max_age_s
        with self._lock:
            # Only a busy server's answers age out (and an idle server's that a busy machine
            # slowed: a co-tenant's spell passes). An idle server's margin changes only with
            # new answers of an idle server: when they aged, the least budget a 422 named moved
            # on a server left alone (9.6 ms, then 7.6, 13.3 and 6.5 within 45 s here, as the
            # window shrank and its fit swung), so a burst after a pause refused the budget a
            # client had just been told would do, and a client retrying with it got a 422 again.
            for aging in (self._residuals, self._rest_contended):
                while aging and aging[0][0] < oldest:
                    aging.popleft()
            # The windows change only when a request is answered or an answer ages out: no
            # refit in between (the fit was most of a controller step's CPU, 4 times a second,
            # on a core the model's threads use).
            windows = (self._residuals, self._rest_residuals, self._rest_contended)
            key = tuple((len(kept), kept[-1][0] if kept else None) for kept in windows)
            if key == self._margin_key:
                return
            self._margin_key = key
            recent = [(a, p) for _, a, p in self._residuals]
            rest = [(a, p) for _, a, p, _ in self._rest_window()]
        ((self.margin, self.margin_ms),) = _margin(recent, (self.quantile,))
        (self.rest_margin, self.rest_margin_ms), (self.refuse_margin, self.refuse_margin_ms) = (
            _margin(rest, (self.quantile, self.refuse_quantile))
        )

    def _rest_window(self) -> list[tuple[float, float, float, bool]]:
        """The idle margin's answers, (time, actual, predicted, contended): the last
        ``residual_window`` of the quiet machine's and the busy machine's together (call it
        holding ``_lock``)."""
        both = [(*e, False) for e in self._rest_residuals]
        both += [(*e, True) for e in self._rest_contended]
        return sorted(both)[-(self._rest_residuals.maxlen or 0) :]

    def pad_ms(self, predicted_ms: float, *, alone: bool = False, refuse: bool = False) -> float:
        """The safety margin on ``predicted_ms`` of time outside the queue (``alone``: an idle
        server's). ``refuse``: the idle server's margin at ``refuse_quantile`` (``alone`` or not),
        which decides whether a budget no stitch meets with the full margin is still served by
        the fastest or refused with a 422; never more than the idle server's full margin (so
        by construction, see ``_margin``; the ``min`` keeps it so while one fit is published
        and the other not yet)."""
        rest = self.rest_margin * predicted_ms + self.rest_margin_ms
        if refuse:
            return min(rest, self.refuse_margin * predicted_ms + self.refuse_margin_ms)
        if alone:
            return rest
        return self.margin * predicted_ms + self.margin_ms

    def image_rate_used(self) -> float:
        """Local images/s, floored by the fleet's per-replica share when Prometheus is known."""
        rate = self.image_rate
        f = self.fleet
        if f and f.arrival_rate is not None and f.replicas:
            rate = max(rate, f.arrival_rate * self.images_per_request / f.replicas)
        return rate

    def _rate_level(self, image_rate: float) -> float:
        """The feed-forward level: how far down the cost range every image must go for the model
        to stay busy at most ``target_utilisation`` of the time at ``image_rate`` images/s."""
        hi, lo = self._hi, self._lo
        if hi - lo <= 1e-9 or image_rate <= 0:
            return 0.0
        cap = self.target_utilisation * 1e3 / image_rate  # ms of compute one image may cost
        return min(1.0, max(0.0, (hi - cap) / (hi - lo)))

    def _target_level(self) -> float:
        level_rate = self._rate_level(self.image_rate_used())
        level_queue = 0.0
        if self.mean_budget_ms:
            # Up to a quarter of the budget waiting is normal; from there to three quarters the
            # level rises from 0 to 1.
            share = self.queued_work_ms / self.mean_budget_ms
            level_queue = min(1.0, max(0.0, (share - 0.25) / 0.5))
        self.level_rate, self.level_queue = level_rate, level_queue
        return max(level_rate, level_queue)

    def _set_level(self, target: float, dt: float) -> None:
        if target >= self.level:
            self.level = target
        else:
            self.level = max(target, self.level - self.release_per_s * dt)
        self.allowed = self._allowed_at(self.level)

    def _refresh_costs(self) -> None:
        """Per-image cost of every stitch (corrections and images per request change them),
        their range and the hull; once per step, before the level is set."""
        self._costs = {s: self.per_image_ms(s) for s in self.ranking}
        self._hi, self._lo = max(self._costs.values()), min(self._costs.values())
        self._hull = self._upper_hull() if self.scores is not None else []

    def _upper_hull(self) -> list[int]:
        """Stitches on the upper concave hull of (per-image cost, score), cheapest first: the
        only ones an average-cost-constrained mix needs (any other is beaten by mixing two of
        these at the same mean cost)."""
        pts = sorted(self.ranking, key=lambda s: (self._costs[s], -self.scores[s]))
        hull: list[int] = []
        for s in pts:
            if hull and self.scores[s] <= self.scores[hull[-1]]:
                continue  # dominated: costs at least as much, no more accurate
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # b lies on or under the segment a..s: not on the hull.
                cross = (self._costs[b] - self._costs[a]) * (self.scores[s] - self.scores[a]) - (
                    self.scores[b] - self.scores[a]
                ) * (self._costs[s] - self._costs[a])
                if cross >= 0:
                    hull.pop()
                else:
                    break
            hull.append(s)
        return hull

    def mix(self, level: float) -> tuple[float, float, float]:
        """For the cost cap at ``level``: the costs of the hull stitches just under and just over
        it, and the share of requests that should get the dearer one so that the mean cost is
        the cap. (cap, cap, 0) when there is nothing to mix."""
        cap = self._hi - level * (self._hi - self._lo)
        costs = [self._costs[s] for s in self._hull]
        if len(costs) < 2 or cap >= costs[-1] or cap <= costs[0]:
            return cap, cap, 0.0
        i = next(k for k in range(1, len(costs)) if costs[k] > cap)
        lo, hi = costs[i - 1], costs[i]
        return lo, hi, (cap - lo) / (hi - lo)

    def mix_state(self) -> dict | None:
        """The hull mix at the current level (None when every request gets the same menu)."""
        if self.level <= 0.0:
            return None
        lo, hi, p = self.mix(self.level)
        if p <= 0.0:
            return None
        return {
            "cheaper_stitch": next(s for s in self._hull if self._costs[s] == lo),
            "dearer_stitch": next(s for s in self._hull if self._costs[s] == hi),
            "dearer_share": round(p, 4),
        }

    def _allowed_at(self, level: float) -> list[int]:
        return self._allowed_under(self._hi - level * (self._hi - self._lo))

    def _allowed_under(self, cap: float) -> list[int]:
        return [s for s in self.ranking if self._costs[s] <= cap + 1e-9]

    # -- between steps: the request path --------------------------------------------------------

    def observe_arrival(self, images: int, now: float) -> None:
        """One request arrived (event loop thread)."""
        self._recent.append((now, images))

    def draw_allowed(self, now: float) -> list[int]:
        """The stitches one request may use now; call once per request, as it advances the mix.

        Between steps, a burst shows in the last arrivals before the smoothed rate catches up:
        if their rate asks for a higher level than the step set, that level applies (a spike's
        first requests then already go to cheaper stitches instead of queueing on expensive
        ones). At a level between two hull stitches, successive draws alternate between their
        menus (error diffusion), so the mean cost meets the cap.
        """
        level = self.level
        recent = self._recent
        if len(recent) == recent.maxlen and now > recent[0][0]:
            level = max(level, self._rate_level(sum(n for _, n in recent) / (now - recent[0][0])))
        if level <= 0.0:
            return self.allowed
        lo, hi, p = self.mix(level)
        if p <= 0.0:
            return self._allowed_at(level)
        # Error diffusion: over consecutive requests, a share p may go up to the dearer hull
        # stitch and the rest up to the cheaper one, so the mean cost meets the cap with the
        # accuracy of the hull, not of the best single stitch under the cap.
        self._credit += p
        if self._credit >= 1.0:
            self._credit -= 1.0
            return self._allowed_under(hi)
        return self._allowed_under(lo)

    # -- views --------------------------------------------------------------------------------

    def state(self) -> dict:
        f = self.fleet
        with self._lock:
            rest = self._rest_window()
        return {
            "load_level": round(self.level, 4),
            "load_level_from_rate": round(self.level_rate, 4),
            "load_level_from_queue": round(self.level_queue, 4),
            "arrival_rate": round(self.arrival_rate, 3),
            "image_rate": round(self.image_rate, 3),
            "images_per_request": round(self.images_per_request, 3),
            "mean_budget_ms": None
            if self.mean_budget_ms is None
            else round(self.mean_budget_ms, 3),
            "queued_work_ms": round(self.queued_work_ms, 3),
            "margin": round(self.margin, 4),
            "margin_ms": round(self.margin_ms, 3),
            "rest_margin": round(self.rest_margin, 4),
            "rest_margin_ms": round(self.rest_margin_ms, 3),
            "rest_answers": len(rest),
            "rest_answers_contended": sum(contended for *_, contended in rest),
            "refuse_margin": round(self.refuse_margin, 4),
            "refuse_margin_ms": round(self.refuse_margin_ms, 3),
            "estimate_pad": round(self.estimate_pad, 4),
            "target_utilisation": self.target_utilisation,
            "slo_target": self.slo_target,
            "margin_quantile": round(self.quantile, 6),
            "refuse_quantile": round(self.refuse_quantile, 6),
            "allowed_stitches": list(self.allowed),
            "device_factor": round(self.device_factor, 4),
            "idle_device_factor": round(self.settled_device_factor, 4),
            "corrections": {
                str(s): round(c, 4) for s, c in sorted(self.latency.corrections().items())
            },
            "updates": self.updates,
            "mix": self.mix_state(),
            "fleet": None
            if f is None
            else {
                "arrival_rate": f.arrival_rate,
                "replicas": f.replicas,
                "attainment": f.attainment,
                "corrections": {str(s): round(c, 4) for s, c in sorted(f.corrections.items())},
                "error": f.error,
                "age_s": None if f.updated is None else round(time.monotonic() - f.updated, 3),
            },
        }


def _values(metric) -> dict[tuple[str, str], float]:
    """(sample name, stitch label or "") -> value, for one prometheus-client metric."""
    out = {}
    for family in metric.collect():
        for s in family.samples:
            out[(s.name, s.labels.get("stitch", ""))] = s.value
    return out


def read_metrics(metrics, queued_work_ms: float) -> Reading:
    """A Reading from the service's own metrics objects (the registry ``/metrics`` exposes)."""
    budget = _values(metrics.request_budget_seconds)
    observed = _values(metrics.compute_seconds)
    profiled = _values(metrics.compute_profiled_seconds)
    return Reading(
        t=time.monotonic(),
        arrivals=_values(metrics.arrivals).get(("snnet_arrivals_total", ""), 0.0),
        images=_values(metrics.images).get(("snnet_images_total", ""), 0.0),
        budget_sum_s=budget.get(("snnet_request_budget_seconds_sum", ""), 0.0),
        budget_count=budget.get(("snnet_request_budget_seconds_count", ""), 0.0),
        queued_work_ms=queued_work_ms,
        observed_s={int(s): v for (name, s), v in observed.items() if name.endswith("_sum") and s},
        profiled_s={
            int(s): v for (name, s), v in profiled.items() if name.endswith("_total") and s
        },
    )
