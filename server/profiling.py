"""The latency profile a server starts from: found, measured within a time budget, estimated,
and calibrated where requests will run.

1. A profile for this device fingerprint (CPU or GPU name, torch, threads, dtype) from the
   manifest or the profile cache, if it covers every stitch at every batch size.
2. Otherwise, measure where requests run, through the serving runner (``ServedTimer``: the
   model process, its threads and its core): the anchors first (always), then the
   accuracy/GFLOPs Pareto front, then the rest spread over the cost range, each stitch at every
   batch size, until ``SNNET_PROFILE_SECONDS`` is spent. Then each stitch measured is timed once
   more at the smallest size, and one that ran much faster then is measured again (``_recheck``:
   something else took the cores while it was measured). Measurements already in the cache are
   reused, and what is measured is kept there, so a later start measures the rest.
3. Stitches not measured are **estimated**: per batch size, a least-squares line of time against
   GFLOPs over the measured stitches, padded to the worst measured stitched route. The
   controller's per-stitch factor corrects them online once they run; ``GET /stitches`` says
   which stitches are estimated.
4. ``calibrate``: time the anchors through the serving runner (a profile from the manifest or
   the cache; a start that measured them has their calls already); when any is outside a 15%
   tolerance, every stitch's profile is mapped onto serving (a factor and a cost per batch, the
   hop to the model process) before the first request. Before that, ``rescale_estimates``:
   the runner's warm-up runs every stitch once, and an estimated stitch's times are scaled by
   how that run compared with its estimate.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import snnet_core
from snnet_core import DeviceFingerprint, LatencyProfile, Manifest, SNNet, StitchMenu

from .config import Settings
from .environ import cores, quota_note
from .imaging import input_decode_ms
from .ingress import HTTP_MS_PRIOR
from .latency import LatencyModel

log = logging.getLogger("snnet.profiling")

CALIBRATION_TOLERANCE = 0.15
CALIBRATION_REPEATS = 3
# A stitch at a batch size is timed SNNET_PROFILE_REPEATS times, or this many once the calls
# took PROFILE_ENOUGH_MS: a median of 5 DeiT-B batches of 8 took 10 s of a start here.
PROFILE_MIN_REPEATS = 3
PROFILE_ENOUGH_MS = 1000.0
# How far one warm-up run may move an estimated stitch's times from where the median of all
# of them moves the estimates (see rescale_estimates).
RESCALE_LIMIT = 1.5
# A stitch measured at start-up is timed once more at the smallest batch size when profiling
# ends; if its profile ran more than this much slower than that, it was measured while
# something else took the cores, and is measured again (see _recheck).
RECHECK_TOLERANCE = 0.2


@dataclass(frozen=True)
class StartProfile:
    """The profile to serve with (every stitch at every batch size) and how it came about."""

    profile: LatencyProfile
    source: str  # "manifest", "cache <path>", "measured ..."
    estimated: frozenset[int]  # stitches whose times are estimated, not measured


def default_cache_path(settings: Settings, sha: str) -> Path:
    if settings.profile_cache is not None:
        return settings.profile_cache
    if os.access(settings.weights, os.W_OK):
        return settings.weights / "profiles.json"
    return Path.home() / ".cache" / "snnet" / f"profiles-{sha[:16]}.json"


def _measured(profile: LatencyProfile, batch_sizes: list[int]) -> set[int]:
    """Stitches the profile has at every batch size."""
    return {s for s, per in profile.latency_ms.items() if set(per) >= set(batch_sizes)}


def measurement_order(menu: StitchMenu) -> list[int]:
    """Anchors, then the Pareto front from cheap to dear, then the rest spread over the cost
    range (the middle, then the quarters, ...): the most useful first if time runs out."""
    anchors = [r.id for r in menu.rows if len(r.anchors) == 1]
    front = sorted((s for s in menu.pareto if s not in anchors), key=lambda s: menu.rows[s].gflops)
    rest = sorted(
        (r.id for r in menu.rows if r.id not in anchors and r.id not in menu.pareto),
        key=lambda s: menu.rows[s].gflops,
    )
    spread, step = [], len(rest)
    while step >= 1 and len(spread) < len(rest):
        for i in range(step // 2, len(rest), max(1, step)):
            if rest[i] not in spread:
                spread.append(rest[i])
        step //= 2
    spread += [s for s in rest if s not in spread]
    return anchors + front + spread


def estimate(
    profile: LatencyProfile, menu: StitchMenu, batch_sizes: list[int]
) -> tuple[LatencyProfile, frozenset[int]]:
    """``profile`` completed for every stitch: per batch size, ms = (a + b x GFLOPs) x pad, the
    line fitted over the measured stitches (b >= 0; proportional to GFLOPs with one point).

    ``pad`` is the largest measured / line ratio among the measured stitched routes (at least
    1): a stitched route can cost more per GFLOP than the anchors that pull the line down (on
    DeiT-Ti/S/B here, 1.25x), and an estimate that is low sends a request over its budget the
    first time that stitch runs, while one that is high only picks a cheaper stitch until the
    controller's per-stitch factor has seen it."""
    measured = _measured(profile, batch_sizes)
    missing = [r.id for r in menu.rows if r.id not in measured]
    full = {s: dict(profile.latency_ms[s]) for s in measured}
    stitched = [s for s in measured if len(menu.rows[s].anchors) > 1] or list(measured)
    for b in batch_sizes:
        xs = [menu.rows[s].gflops for s in measured]
        ys = [profile.latency_ms[s][b] for s in measured]
        if len(xs) >= 2 and statistics.pvariance(xs) > 0:
            slope, intercept = statistics.linear_regression(xs, ys)
            if slope < 0:
                slope, intercept = 0.0, statistics.fmean(ys)
        else:
            slope, intercept = ys[0] / xs[0] if xs[0] > 0 else 0.0, 0.0

        floor = 0.5 * min(ys)  # no estimate below half the fastest measured stitch's time
        on_line = {r.id: max(intercept + slope * r.gflops, floor) for r in menu.rows}
        pad = max([1.0] + [profile.latency_ms[s][b] / on_line[s] for s in stitched])
        for s in missing:
            full.setdefault(s, {})[b] = round(pad * on_line[s], 4)
    out = LatencyProfile(
        profile.fingerprint, list(batch_sizes), full, profile.repeats, profile.warmup
    )
    return out, frozenset(missing)


def rescale_estimates(
    profile: LatencyProfile, estimated: frozenset[int], first_ms: dict[int, float], batch: int
) -> tuple[LatencyProfile, list[float]]:
    """``profile`` with each estimated stitch's times scaled, at every batch size, by how its
    warm-up run at ``batch`` compared with its estimate there (``first_ms``: the runner's
    warm-up, which runs every stitch once anyway), and the factors applied.

    One timed run is a measurement where the GFLOPs line is a guess: on the DeiT-Ti/S/B net
    here, a warm-up run took 1.00-1.10x (10th-90th percentile) its stitch's later median
    (``bench/warmup_timing.py``), while estimates were off by 0.84-1.44x on their first runs.
    A stitch stays "estimated" (it has one run at one size); the controller's per-stitch factor
    refines it online as before.

    Each factor is kept within RESCALE_LIMIT of the median factor: a warm-up run that stalled
    must not make its stitch look so dear that it is never chosen, and so never corrected;
    but when the estimates are off together, the warm-up runs all say so and the median
    follows them (one DeiT start here profiled its few stitches while the VM ran slow, and
    every estimate came out 2x or more too dear)."""
    raw: dict[int, float] = {}
    rows = {s: dict(per_bs) for s, per_bs in profile.latency_ms.items()}
    for s in sorted(estimated):
        ms, est = first_ms.get(s), rows.get(s, {}).get(batch)
        if ms is not None and est and est > 0 and ms > 0:
            raw[s] = ms / est
    factors = []
    if raw:
        mid = statistics.median(raw.values())
        for s, f in raw.items():
            f = min(mid * RESCALE_LIMIT, max(mid / RESCALE_LIMIT, f))
            rows[s] = {b: round(v * f, 4) for b, v in rows[s].items()}
            factors.append(f)
    out = LatencyProfile(
        profile.fingerprint, list(profile.batch_sizes), rows, profile.repeats, profile.warmup
    )
    return out, factors


def _nearest(manifest: Manifest, fp: DeviceFingerprint) -> str:
    """How the manifest's profile nearest to ``fp`` differs from it, in words (with what writes
    one that is used)."""
    fields = ("device_type", "device_name", "torch", "threads", "dtype")

    def differ(p: LatencyProfile) -> list[str]:
        return [f for f in fields if getattr(p.fingerprint, f) != getattr(fp, f)]

    near = min(manifest.profiles, key=lambda p: len(differ(p)))
    said = ", ".join(
        f"{f} {getattr(near.fingerprint, f)!r}, served with {getattr(fp, f)!r}"
        for f in differ(near)
    )
    hint = ""
    if differ(near) == ["threads"] and fp.device_type == "cpu":  # (on CUDA: the SM count)
        hint = (
            f" (`snnet profile --threads {fp.threads}` writes one that is used, or serve with "
            f"SNNET_THREADS={near.fingerprint.threads})"
        )
    return f"the nearest has {said}{hint}; measuring here instead"


def choose_profile(
    s: Settings,
    manifest: Manifest,
    menu: StitchMenu,
    fp: DeviceFingerprint,
    measure: Callable[[int, list[int]], dict[int, float]],
    check: Callable[[], None],
) -> StartProfile:
    """Steps 1-3 of the module docstring, for the device fingerprint ``fp``; ``measure(stitch,
    sizes)`` gives a stitch's ms at each size (``ServedTimer``: where requests run)."""
    sizes = s.batch_sizes()
    everything = set(range(len(menu)))
    found = manifest.profile_for(fp)
    if found and _measured(found, sizes) >= everything:
        return StartProfile(found, "manifest", frozenset())
    if found:  # (one `snnet profile --batch-sizes 1,8` wrote was passed over without a word)
        lacking = sorted(set(sizes) - set(found.batch_sizes))
        have, want = (",".join(map(str, b)) for b in (found.batch_sizes, sizes))
        log.info(
            "the manifest's profile for this device is not used: %s (`snnet profile "
            "--batch-sizes %s` writes one that is, or serve with SNNET_PROFILE_BATCH_SIZES=%s)",
            f"it lacks batch sizes {lacking} of the {want} served" if lacking
            else "it lacks some stitches", want, have,
        )  # fmt: skip
    elif manifest.profiles:  # (`snnet profile` at torch's 2 threads, served at auto's 1)
        log.info("the manifest's profiles are not for this device: %s", _nearest(manifest, fp))
    cache = default_cache_path(s, manifest.weights_sha256)
    cached = _read_cache(cache, manifest.weights_sha256)
    mine = next((p for p in cached if p.fingerprint == fp), None)
    if mine is not None and _measured(mine, sizes) >= everything:
        return StartProfile(mine, f"cache {cache}", frozenset())
    have = _measured(mine, sizes) if mine is not None else set()
    todo = [x for x in measurement_order(menu) if x not in have]
    anchors = {r.id for r in menu.rows if len(r.anchors) == 1}
    log.info(
        "latency profile for this device (%s, %s, %d thread%s): %d of %d stitches in the "
        "cache; measuring the rest at batch sizes %s for up to %g s (anchors always)",
        fp.device_name, fp.dtype, fp.threads, "" if fp.threads == 1 else "s", len(have),
        len(menu), sizes, s.profile_seconds,
    )  # fmt: skip
    profile = LatencyProfile(fp, sizes, {x: dict(mine.latency_ms[x]) for x in have} if mine else {})
    profile.repeats, profile.warmup = s.profile_repeats, 1
    t0 = time.monotonic()
    for i, stitch in enumerate(todo, 1):
        if time.monotonic() - t0 > s.profile_seconds and stitch not in anchors:
            break
        check()
        profile.latency_ms[stitch] = measure(stitch, sizes)
        if i == len(todo) or i % max(1, len(todo) // 10) == 0:
            log.info("profiling: %d/%d stitches measured (%.0f s)", i, len(todo),
                     time.monotonic() - t0)  # fmt: skip
    measured_now = len(_measured(profile, sizes)) - len(have)
    _recheck(profile, [x for x in todo if x in profile.latency_ms], sizes, measure, check)
    where = _write_cache(cache, manifest.weights_sha256, cached, profile)
    full, estimated = estimate(profile, menu, sizes)
    if estimated:
        log.info("%d stitches estimated from GFLOPs (corrected online as they run)", len(estimated))
    source = f"measured {measured_now} stitches in {time.monotonic() - t0:.0f} s, {where}"
    if estimated:
        source += f", {len(estimated)} estimated"
    return StartProfile(full, source, estimated)


def _recheck(
    profile: LatencyProfile,
    stitches: list[int],
    sizes: list[int],
    measure: Callable[[int, list[int]], dict[int, float]],
    check: Callable[[], None],
) -> None:
    """Time each of ``stitches`` (measured by this start) once more at the smallest batch size;
    one whose profile ran more than RECHECK_TOLERANCE slower than that is measured again at
    every size, keeping the faster of the two medians per size (in ``profile``).

    Profiling takes tens of seconds; what else runs on the machine meanwhile (a co-tenant, a
    second replica starting) slows the stitches measured then and not the others. On the DeiT
    net here, DeiT-B measured at 510 ms while it served at 270-300 ms, and every stitch
    estimated from it came out up to 3x dear: the online corrections could not tell the device
    from the stitches, and a minute later the least budget a 422 named was still 130-210 ms for
    a stitch that answered in 45 (bench/data/deit_idle_rows/run2.jsonl). A profile slower than
    the second timing is what a disturbance leaves; a faster one is not (the second timing was
    then the disturbed one), and stands."""
    if not stitches:
        return
    smallest = min(sizes)
    again: list[tuple[int, float, float]] = []
    for s in stitches:
        check()
        now = measure(s, [smallest])[smallest]
        if profile.latency_ms[s][smallest] > (1.0 + RECHECK_TOLERANCE) * now:
            again.append((s, profile.latency_ms[s][smallest], now))
    for s, _, _ in again:
        check()
        row = measure(s, sizes)
        profile.latency_ms[s] = {b: min(ms, row[b]) for b, ms in profile.latency_ms[s].items()}
    if again:
        log.info(
            "profiling: %d of %d stitches ran faster when timed again (something else took the "
            "cores while they were measured?), measured again: %s", len(again), len(stitches),
            ", ".join(
                f"stitch {s} {before:.1f} -> {profile.latency_ms[s][smallest]:.1f} ms"
                for s, before, _ in again
            ),
        )  # fmt: skip


def _write_cache(
    cache: Path, sha: str, cached: list[LatencyProfile], profile: LatencyProfile
) -> str:
    """Keep what was measured (only that) in the cache; where it went, for the log."""
    profiles = [p for p in cached if p.fingerprint != profile.fingerprint] + [profile]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Per process: replicas sharing a cache volume must not write one temporary file.
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        body = {"weights_sha256": sha, "profiles": [p.to_dict() for p in profiles]}
        tmp.write_text(json.dumps(body, indent=1))
        os.replace(tmp, cache)
        return f"kept in {cache}"
    except OSError as e:
        log.warning("could not write the profile cache %s: %s", cache, e)
        return "not cached"


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


Run = tuple[float, float]  # one call through the runner: (its ms, the forward's ms in it)


def _timed(
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    stitch: int,
    repeats: int,
    check: Callable[[], None],
    clock: Callable[[], float],
    enough_ms: float = math.inf,
) -> list[Run]:
    """``repeats`` calls of ``stitch`` on ``x`` through ``runner`` (fewer, but at least
    ``PROFILE_MIN_REPEATS``, once they took ``enough_ms``): each call's ms and its forward's
    (the runner's ``last_forward_ms``, the whole call where it has none)."""
    runs: list[Run] = []
    for _ in range(repeats):
        if len(runs) >= PROFILE_MIN_REPEATS and sum(s for s, _ in runs) >= enough_ms:
            break
        check()
        t0 = clock()
        runner(x, stitch)
        served = (clock() - t0) * 1e3
        ms = getattr(runner, "last_forward_ms", None)
        runs.append((served, served if ms is None else min(ms, served)))
    return runs


class ServedTimer:
    """``measure`` for ``choose_profile``: a stitch's time per batch size where requests run,
    through the serving runner (the model process, its threads and core): the median forward of
    ``repeats`` calls, or of ``PROFILE_MIN_REPEATS`` once they took ``PROFILE_ENOUGH_MS``,
    after one untimed call at that size unless the runner's warm-up ran it (``warmed``).

    A profile measured in the server's own process, then mapped onto the model process by timing
    the anchors again (``calibrate``), cost a DeiT-Ti/S/B start here 34 s of profiling and 10 s
    of calibration, and the map was a second measurement with its own noise. Timed here, the
    anchors' calls are the calibration too (``runs``: (stitch, batch) -> the calls)."""

    def __init__(
        self,
        runner: Callable[[torch.Tensor, int], torch.Tensor],
        input_size: tuple[int, ...],
        repeats: int,
        check: Callable[[], None] = lambda: None,
        warmed: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset(),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.runner, self.input_size, self.repeats = runner, tuple(input_size), repeats
        self.check, self.warmed, self.clock = check, warmed, clock
        self.runs: dict[tuple[int, int], list[Run]] = {}
        self._gen = torch.Generator().manual_seed(0)

    def __call__(self, stitch: int, sizes: list[int]) -> dict[int, float]:
        out = {}
        for b in sizes:
            x = torch.randn(b, *self.input_size, generator=self._gen)
            if (stitch, b) not in self.warmed:  # a first call at a new size picks kernels
                self.check()
                self.runner(x, stitch)
            runs = _timed(
                self.runner, x, stitch, self.repeats, self.check, self.clock, PROFILE_ENOUGH_MS
            )
            self.runs[(stitch, b)] = runs
            out[b] = round(statistics.median(f for _, f in runs), 4)
        return out


def calibrate(
    net: SNNet,
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    profile: LatencyProfile,
    batch_sizes: list[int],
    check: Callable[[], None],
    estimated: frozenset[int] = frozenset(),
    first_ms: dict[int, float] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    timed: dict[tuple[int, int], list[Run]] | None = None,
) -> tuple[LatencyProfile, str, list[float]]:
    """Time the anchors where the model serves (through ``runner``: the same process layout,
    threads and socket as requests; or take their calls from ``timed``, ``ServedTimer.runs``,
    where this start measured them so) against ``profile``; the profile mapped onto what they
    showed, what was found, and the factors ``rescale_estimates`` applied to the
    ``estimated`` stitches from their warm-up runs (``first_ms``, the runner's), if given.
    Those runs are times on this machine, so they enter the profile divided by the map's
    factor at the smallest batch size (else a profile from a machine that ran 1.5x faster
    would have them at 1.5x once mapped).

    Two things make served times differ from a profile. A cost per batch that profiling in
    this process does not see: the hop to the model process and back (here 0.7 ms for one
    3x224x224 image, 1.3 ms for 8, by shared memory; +4% on DeiT-Ti, +0.4% on DeiT-B, so one
    factor fits neither). And a factor: a profile from the manifest or the cache names a CPU
    model, but on a virtual machine that is not an identity (a slower machine with the same
    name used to inherit a faster one's profile). So per timed batch size, ``served = f x
    profiled + c`` over the anchors: f from their forwards as the model process timed them, c
    from the rest of each call (``_fit``), and when any anchor is outside
    ``CALIBRATION_TOLERANCE`` of its profile the map (interpolated in batch size) is applied to
    every stitch before the first request; the controller refines it online. A profile measured
    through ``runner`` in this start (``timed``) is always mapped, with f = 1: the map adds the
    hop its calls showed.

    A timed map (not one from ``timed``) is checked against the warm-up runs of the measured
    stitches that are not anchors (``first_ms``; a few seconds earlier, in the same process):
    when the map puts them, at the median, outside ``CALIBRATION_TOLERANCE`` of their runs,
    the anchors are timed once more and the map that agrees better is kept. A calibration timed while something else took the
    cores (on the DeiT net here, a test run beside the server: x2.36 + 3.3 ms, the warm-up runs
    at the profile) would otherwise leave every measured stitch, the anchors with the cheapest
    of them, too dear to be chosen, and so to be corrected online: budgets up to 85 ms got a
    422 where 40 ms would do.
    """
    anchors = [st.id for st in net.stitches if not st.cut]
    base = LatencyModel(profile)
    smallest = min(batch_sizes)
    sizes = sorted(set(batch_sizes))
    if timed and all((a, b) in timed for a in anchors for b in sizes):
        calls = {(a, b): timed[(a, b)] for a in anchors for b in sizes}
        return _as_measured(profile, base, calls, smallest, estimated, first_ms)
    fits, ratios = _time_anchors(net, runner, base, anchors, batch_sizes, check, clock)
    runs = {
        s: ms
        for s, ms in (first_ms or {}).items()
        if s not in estimated and s not in anchors and s in profile.latency_ms
    }
    if runs:
        agree = _agreement(fits, base, runs, smallest)
        if abs(agree - 1.0) > CALIBRATION_TOLERANCE:
            log.info(  # routine on a shared VM: a second timing settles it
                "calibration: its map puts the warm-up runs of %d measured stitches at x%.2f; "
                "timing the anchors again", len(runs), agree,
            )  # fmt: skip
            again, again_ratios = _time_anchors(
                net, runner, base, anchors, batch_sizes, check, clock
            )
            agree_again = _agreement(again, base, runs, smallest)
            if abs(math.log(agree_again)) < abs(math.log(agree)):
                fits, ratios, agree = again, again_ratios, agree_again
            # Still off is routine on a noisy VM (both timings disagree with the warm-up runs
            # on most starts there) and nothing a user can act on: the controller corrects the
            # predictions from the first requests. Said as such, not as a warning.
            log.info(
                "calibration: kept the map that puts them at x%.2f%s", agree,
                "; the predictions are corrected online from the first requests"
                if abs(agree - 1.0) > CALIBRATION_TOLERANCE else "",
            )  # fmt: skip
    ratio = statistics.median(ratios)
    spread = f"anchors ran x{min(ratios):.2f}..x{max(ratios):.2f} of the profile here"
    trusted = all(abs(r - 1.0) <= CALIBRATION_TOLERANCE for r in ratios)
    factors: list[float] = []
    if estimated and first_ms:
        f = 1.0 if trusted else _at(fits, smallest)[0]
        profile, factors = rescale_estimates(
            profile, estimated, {s: ms / f for s, ms in first_ms.items()}, smallest
        )
    if trusted:
        log.info("calibration: %s: within %.0f%%, profile trusted",
                 spread, CALIBRATION_TOLERANCE * 100)  # fmt: skip
        return profile, f"calibrated x{ratio:.2f}, trusted", factors
    how = _how(fits)
    # Routine, not a fault: a profile from another machine, or the hop, is what the map is for.
    log.info("calibration: %s: outside %.0f%%, every stitch mapped to serving: %s",
             spread, CALIBRATION_TOLERANCE * 100, how)  # fmt: skip
    return _mapped(profile, fits), f"calibrated x{ratio:.2f}, rescaled ({how})", factors


def _as_measured(
    profile: LatencyProfile,
    base: LatencyModel,
    calls: dict[tuple[int, int], list[Run]],
    smallest: int,
    estimated: frozenset[int],
    first_ms: dict[int, float] | None,
) -> tuple[LatencyProfile, str, list[float]]:
    """``calibrate`` for a profile this start measured through the runner: the anchors' calls
    then (``calls``) are the calibration, f = 1 by construction (the forwards are the profile)
    and c the hop those calls showed. Nothing to check it against, and the map is always
    applied: it adds only the hop, which it measured too."""
    fits, _ = _fits(calls, base)
    # (f comes out 1 but where LatencyModel made a noisy profile monotone in batch size)
    fits = {b: (1.0, c) for b, (_, c) in fits.items()}
    factors: list[float] = []
    if estimated and first_ms:
        profile, factors = rescale_estimates(profile, estimated, dict(first_ms), smallest)
    how = _how(fits)
    log.info("calibration: measured where it serves; every stitch mapped to serving: %s "
             "(the hop to the model and back)", how)  # fmt: skip
    return _mapped(profile, fits), f"calibrated as measured ({how})", factors


def _mapped(profile: LatencyProfile, fits: dict[int, tuple[float, float]]) -> LatencyProfile:
    """``profile`` with every time put through the map ``f x ms + c`` of its batch size."""
    return LatencyProfile(
        profile.fingerprint,
        list(profile.batch_sizes),
        {
            s: {b: round(_at(fits, b)[0] * ms + _at(fits, b)[1], 4) for b, ms in per.items()}
            for s, per in profile.latency_ms.items()
        },
        profile.repeats,
        profile.warmup,
    )


def _how(fits: dict[int, tuple[float, float]]) -> str:
    return ", ".join(f"x{f:.2f} + {c:.2f} ms at batch {b}" for b, (f, c) in sorted(fits.items()))


def _time_anchors(
    net: SNNet,
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    base: LatencyModel,
    anchors: list[int],
    batch_sizes: list[int],
    check: Callable[[], None],
    clock: Callable[[], float],
) -> tuple[dict[int, tuple[float, float]], list[float]]:
    """``_fits`` of CALIBRATION_REPEATS calls of each anchor at each batch size through
    ``runner``."""
    runs = {}
    for b in sorted(set(batch_sizes)):
        x = torch.zeros(b, *net.input_size)
        for a in anchors:
            runs[(a, b)] = _timed(runner, x, a, CALIBRATION_REPEATS, check, clock)
    return _fits(runs, base)


def _fits(
    runs: dict[tuple[int, int], list[Run]], base: LatencyModel
) -> tuple[dict[int, tuple[float, float]], list[float]]:
    """The map ``served = f x profiled + c`` per batch size from the anchors' calls (``runs``:
    (anchor, batch) -> calls; ``_fit``), and each anchor's served / profiled (medians). The
    forward's ms tells the forward from the rest of a call."""
    points: dict[int, list[tuple[float, float]]] = {}
    hops: dict[int, list[float]] = {}
    ratios = []
    for (a, b), calls in runs.items():
        p = base.base_ms(a, b)
        points.setdefault(b, []).append((p, statistics.median(f for _, f in calls)))
        hops.setdefault(b, []).extend(served - f for served, f in calls)
        ratios.append(statistics.median(served for served, _ in calls) / p)
    return {b: _fit(points[b], hops[b]) for b in sorted(points)}, ratios


def _agreement(
    fits: dict[int, tuple[float, float]], base: LatencyModel, runs: dict[int, float], batch: int
) -> float:
    """The median of warm-up run / (the map's factor x profile) over ``runs`` (stitch -> ms at
    ``batch``). Not the map's per-batch cost: the warm-up runs were timed inside the model
    process, without the hop to it (as ``rescale_estimates`` takes them). 1.0 with no usable
    run."""
    f = _at(fits, batch)[0]
    ratios = [
        ms / (f * p)
        for s, ms in runs.items()
        if f > 0 and ms > 0 and (p := base.base_ms(s, batch)) > 0
    ]
    return statistics.median(ratios) if ratios else 1.0


def _fit(points: list[tuple[float, float]], hops: list[float]) -> tuple[float, float]:
    """(f, c) of ``served = f x profiled + c`` from (profiled, forward) points and the rest of
    each call (``hops``): f by least squares through the origin over the forwards (the device's
    speed against the profile's), c the median of the rest (the hop to the model process and
    back, a cost per batch the in-process profile does not see).

    Not one line fitted to the calls: over anchors whose times span a narrow range (the
    bundled model's run 1.2-2.6 ms at batch 1) a few tenths of a ms of noise tilted it to x0.69
    + 1.53 ms where the forwards ran at x1.0 and the hop was 0.3-0.7 ms."""
    xs = [p for p, _ in points]
    f = sum(p * w for p, w in points) / sum(p * p for p in xs)
    return f, max(0.0, statistics.median(hops)) if hops else 0.0


def _at(fits: dict[int, tuple[float, float]], b: int) -> tuple[float, float]:
    """The fitted map at batch size ``b``: linear between timed sizes, the nearest outside."""
    sizes = sorted(fits)
    if b <= sizes[0]:
        return fits[sizes[0]]
    if b >= sizes[-1]:
        return fits[sizes[-1]]
    hi = next(k for k in sizes if k >= b)
    lo = max(k for k in sizes if k <= b)
    if hi == lo:
        return fits[lo]
    w = (b - lo) / (hi - lo)
    (f0, c0), (f1, c1) = fits[lo], fits[hi]
    return f0 + w * (f1 - f0), c0 + w * (c1 - c0)


# Threads for a CPU model on n cores: n - 1 (a core left to the event loop, which reads, parses
# and decodes requests and answers them) or n. Under load, on n - 1 threads the model and the
# front end run side by side and a request costs the model t(n - 1); on n, the front end's work
# for each request (front_ms) runs on a core the model's team needs, and the team waits for it
# at its next barrier: a request costs about t(n) + front_ms. Every core goes to the model only
# if its largest and its smallest anchor (under load the controller moves to the cheap
# stitches) both run
#     t(n - 1) >= (1 + THREADS_GAIN) x t(n) + front_ms,
# which also makes n the faster count at idle. THREADS_GAIN is a margin for noise and for what
# sharing a core costs beyond front_ms; from 11 cores up no model can gain it from the last
# core (n / (n - 1) <= 1.1), so n - 1 is taken without timing. front_ms is the least a request
# brings: one image of the model's input size decoded and preprocessed, measured at start-up,
# plus the ingress's prior for the rest of the HTTP path (server.ingress.HTTP_MS_PRIOR, 1 ms:
# on the 2-core VM `bench/server_overhead.py` puts the whole path at 1.1-1.3 ms a request,
# client included). The anchors are timed at batch 1; under load requests batch, the model's
# cost per request falls and the front end's does not (at batch B the test would be t_B(n - 1)
# >= 1.1 x t_B(n) + B x front_ms). At batch 8 both nets here get the answer batch 1 gives
# (`python bench/threads_choice.py --batch-check 8`): the bundled model's smallest anchor ran
# 4.11 ms on 1 thread and 3.11 on 2, where 2 threads needed 12.0; DeiT-Ti 259 and 138 ms
# (170 needed), DeiT-B 3412 and 1831 ms (2032 needed).
#
# The 2-core VM's record. The bundled model: largest anchor 4.9-6.1 ms on 1 thread and 3.7-4.8
# on 2, smallest 1.16-1.42 and 1.35-1.52; `bench/load.py --quick` met 58-64% of budgets on 2
# threads against 98% on 1. In session 15 its smallest anchor ran 1.23 ms on 1 thread and 0.90
# on 2 (1.37x; the rule was a flat 15% then, and took 2); with the same arrivals and budgets
# (`--capacity 29 --budgets 60,120,240`) it met 86.0% on 2 threads against 98.0% on 1. Its
# front end costs as much as its cheap stitches: t(2) + front_ms is 2.3-2.5 ms, far above
# t(1). DeiT-Ti/S/B (front_ms 1 + 1.3-2.0 ms for a 224x224 JPEG): DeiT-B 294 and 171 ms,
# DeiT-Ti 30 and 19 ms on 1 and 2 threads; 2 threads serve DeiT-B at 222-293 ms where 1 served
# it at 404-465. Until session 19 the rule asked every core for half of what it could give at
# best (1.5x on 2 cores) whatever the front end cost; DeiT-Ti's gain measured 1.25-2.05x there,
# and one start in three served the DeiT net on 1 thread (bench/RESULTS.md, session 19).
THREADS_GAIN = 0.1
# Fewer threads by a margin this close (t(n - 1) within 20% of what n asks, for every anchor):
# time once more before deciding. With a neighbour busy 30% of the time on the DeiT net, one
# choice in 8 took 1 thread on a DeiT-Ti whose every 2-thread run was slowed (31.6 ms, 17-26 in
# the other seven).
SECOND_LOOK = 0.8
# Or every core made the largest anchor this much slower than one core fewer: a sign that
# something else held a core for the whole timing (the DeiT net's DeiT-B took 870.65 ms on 2
# threads against 579.11 on 1 in a start right after its checkpoint was written, 266-298 against
# 439-487 in five other starts; it then served on 1 thread for its lifetime).
SLOWER_LOOK = 1.2


def pick_threads(ms: dict[str, dict[int, float]], n: int, front_ms: float) -> int:
    """Of ``n - 1`` and ``n`` threads, given each deciding anchor's time on each (``ms["largest"]
    [k]``, ``ms["smallest"][k]``) and the front end's work for one request: ``n`` only if every
    one of them runs ``t[n - 1] >= (1 + THREADS_GAIN) * t[n] + front_ms``."""
    return (
        n if all(t[n - 1] >= (1 + THREADS_GAIN) * t[n] + front_ms for t in ms.values()) else n - 1
    )


def deciding_anchors(menu: StitchMenu) -> dict[str, int]:
    """The stitches the thread count is chosen on: the largest and the smallest anchor."""
    anchors = [r for r in menu.rows if len(r.anchors) == 1]
    return {
        "largest": max(anchors, key=lambda r: r.gflops).id,
        "smallest": min(anchors, key=lambda r: r.gflops).id,
    }


def threads_from_profiles(
    menu: StitchMenu, by_threads: dict[int, dict], n: int, front_ms: float
) -> int:
    """What ``pick_threads`` takes from stored profiles (``by_threads[k]`` a profile's
    ``latency_ms`` measured with k threads) of ``n - 1`` and ``n`` threads."""
    return pick_threads(
        {
            name: {k: by_threads[k][s][1] for k in (n - 1, n)}
            for name, s in deciding_anchors(menu).items()
        },
        n,
        front_ms,
    )


def front_end_ms(transform, input_size: tuple[int, ...]) -> float:
    """The front end's least work for one request to this model, in ms: its one image decoded
    and preprocessed (measured here) plus the rest of the HTTP path (the ingress's prior)."""
    return HTTP_MS_PRIOR + input_decode_ms(transform, input_size)


def thread_times(
    net: SNNet,
    menu: StitchMenu,
    counts: tuple[int, ...],
    floor_ms: float = 100.0,
    repeats: int = 5,
    batch: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, dict[int, float]]:
    """ms of the largest and the smallest anchor at ``batch`` on each of ``counts`` torch threads
    (``ms[name][k]``), each the fastest of at least ``repeats`` runs and ``floor_ms`` of them
    (50 runs at most). The runs take turns, one of each anchor on each count in every round: a
    spell of noise on a shared VM then falls on all of them, not on one anchor or one count (the
    DeiT net's smallest anchor, timed in a block of 0.3 s after the largest, once ran 59.6 ms on
    2 threads and 40.3 on 1; 17-31 ms on 2 in the other rounds). torch.set_num_threads drops
    oneDNN's cached primitives, but a run just after a switch was no slower here (ResNet-18 and
    -50 at batch 1, the fastest of 8: 34.6 and 103.3 ms on 1 thread against 37.2 and 96.5 for
    the run after it). Leaves torch on the last count."""
    p0 = next(net.parameters())
    x = torch.zeros(batch, *net.input_size, device=p0.device, dtype=p0.dtype)
    anchors = deciding_anchors(menu)
    times = {name: {k: [] for k in counts} for name in anchors}

    def enough(runs: dict[int, list[float]]) -> bool:
        least = min(map(len, runs.values()))
        return least >= repeats and (min(map(sum, runs.values())) >= floor_ms or least >= 50)

    with torch.inference_mode():
        for k in counts:  # each count's first runs start its thread team
            torch.set_num_threads(k)
            for stitch in anchors.values():
                net(x, stitch)
        while not all(map(enough, times.values())):
            for name, stitch in anchors.items():
                if enough(times[name]):
                    continue
                for k, runs in times[name].items():
                    torch.set_num_threads(k)
                    t0 = clock()
                    net(x, stitch)
                    runs.append((clock() - t0) * 1e3)
    # The fastest run: noise on a shared VM only ever adds (a 2 ms anchor's median of 5 moved
    # by 20% between starts and flipped the choice).
    return {name: {k: min(runs) for k, runs in t.items()} for name, t in times.items()}


def choose_threads(net: SNNet, menu: StitchMenu, front_ms: float) -> tuple[int, str]:
    """torch threads for the model on CPU, by measurement (``thread_times`` on the cores minus
    one and on every core, then ``pick_threads``; timed twice when fewer threads win only by a
    little, ``SECOND_LOOK``), and the figures behind the choice. On 2 cores the bundled model
    serves best on 1 thread, DeiT-Ti/S/B on 2."""
    n, note = cores(), quota_note()
    if n == 1:
        return 1, f"1 core{note}"
    if n / (n - 1) <= 1 + THREADS_GAIN:
        return n - 1, (
            f"{n} cores{note}: a model can gain at most {n}/{n - 1} from the last, not more than the "
            f"{1 + THREADS_GAIN:g}x asked of it; one is left to the event loop"
        )
    which = deciding_anchors(menu)
    ms = thread_times(net, menu, (n - 1, n))
    again = pick_threads(ms, n, front_ms) < n and (
        all(t[n - 1] >= SECOND_LOOK * ((1 + THREADS_GAIN) * t[n] + front_ms) for t in ms.values())
        or ms["largest"][n] > SLOWER_LOOK * ms["largest"][n - 1]
    )
    if again:  # close, or implausible: a slow spell may have spoilt a count's every run
        more = thread_times(net, menu, (n - 1, n))
        ms = {name: {k: min(v, more[name][k]) for k, v in t.items()} for name, t in ms.items()}
    figures = "; ".join(
        f"{name} anchor (stitch {which[name]}) at batch 1: "
        + ", ".join(f"{k} thread{'s' if k > 1 else ''} {v:.2f} ms" for k, v in t.items())
        for name, t in ms.items()
    )
    rule = (
        f"{n} threads only if t({n - 1}) >= {1 + THREADS_GAIN:g} x t({n}) + {front_ms:.2f} ms "
        f"(the front end's work for one request) for both{note}"
    )
    return pick_threads(ms, n, front_ms), (
        f"{figures}{' (timed twice: close)' if again else ''}; {rule}"
    )


DTYPE_ACCURACY_POINTS = 0.5  # a dtype may serve if no stitch loses more top-1 than this


def eligible_dtypes(manifest: Manifest, device: torch.device) -> tuple[list[str], str]:
    """float32, and each other dtype this device runs whose held-out top-1 the manifest records
    (``snnet eval --dtype ... --write``) within ``DTYPE_ACCURACY_POINTS`` of float32 for every
    stitch; and why the others are not."""
    by_dtype = manifest.evaluation.get("accuracy_by_dtype", {})
    every = {str(r["id"]) for r in manifest.stitches}
    reference = by_dtype.get("float32", {})
    ok, why = ["float32"], []
    for name in ("bfloat16", "float16"):
        if name == "float16" and device.type != "cuda":
            continue
        acc = by_dtype.get(name, {})
        missing = [d for d, a in ((name, acc), ("float32", reference)) if not set(a) >= every]
        if missing:
            why.append(
                f"{name} is not: the checkpoint lacks {' and '.join(missing)} held-out accuracy "
                f"for some stitch, on one split; "
                + " then ".join(f"`snnet eval --dtype {d} --write`" for d in reversed(missing))
                + " on the same data records it"
            )
            continue
        worst = max(reference[s] - acc[s] for s in every)
        if worst > DTYPE_ACCURACY_POINTS:
            why.append(f"{name} is not: it loses up to {worst:.2f} points of accuracy")
        else:
            ok.append(name)
    return ok, "; ".join(why)


def choose_dtype(
    net: SNNet, menu: StitchMenu, manifest: Manifest, device: torch.device, repeats: int = 3
) -> tuple[str, str]:
    """The fastest eligible dtype for the largest anchor at batch 1 on ``device`` (float32 when
    it is the only one eligible), and the figures behind the choice."""
    names, why = eligible_dtypes(manifest, device)
    if len(names) == 1:
        return "float32", f"the only dtype eligible; {why}" if why else "the only dtype eligible"
    anchors = [r for r in menu.rows if len(r.anchors) == 1]
    largest = max(anchors, key=lambda r: r.gflops).id
    ms = {}
    with torch.inference_mode():
        for name in names:
            dtype = snnet_core.DTYPES[name]
            # A copy: casting the net itself down and back would round its float32 weights.
            trial = copy.deepcopy(net).to(device, dtype)
            x = torch.zeros(1, *net.input_size, device=device, dtype=dtype)
            trial(x, largest)
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                trial(x, largest)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t0) * 1e3)
            ms[name] = statistics.median(times)
            del trial
    pick = min(ms, key=ms.get)
    figures = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
    return pick, f"stitch {largest} at batch 1: {figures}" + (f"; {why}" if why else "")
