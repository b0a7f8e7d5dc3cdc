"""The latency profile a server starts from: found, measured within a time budget, estimated,
and calibrated where requests will run.

1. A profile for this device fingerprint (CPU or GPU name, torch, threads, dtype) from the
   manifest or the profile cache, if it covers every stitch at every batch size.
2. Otherwise, measure: the anchors first (always), then the accuracy/GFLOPs Pareto front, then
   the rest spread over the cost range, each stitch at every batch size, until
   ``SNNET_PROFILE_SECONDS`` is spent. Measurements already in the cache are reused, and what
   is measured is kept there, so a later start measures the rest.
3. Stitches not measured are **estimated**: per batch size, a least-squares line of time against
   GFLOPs over the measured stitches. The controller's per-stitch factor corrects them online
   once they run; ``GET /stitches`` says which stitches are estimated.
4. ``calibrate``: time the anchors through the serving runner; outside a 15% tolerance every
   prediction is rescaled from the first request on.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import snnet_core
from snnet_core import DeviceFingerprint, LatencyProfile, Manifest, SNNet, StitchMenu

from .config import Settings
from .latency import LatencyModel

log = logging.getLogger("snnet.profiling")

CALIBRATION_TOLERANCE = 0.15
CALIBRATION_REPEATS = 3


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
    """``profile`` completed for every stitch: per batch size, ms = a + b x GFLOPs fitted over the
    measured stitches (b >= 0; proportional to GFLOPs with one point)."""
    measured = _measured(profile, batch_sizes)
    missing = [r.id for r in menu.rows if r.id not in measured]
    full = {s: dict(profile.latency_ms[s]) for s in measured}
    for b in batch_sizes:
        xs = [menu.rows[s].gflops for s in measured]
        ys = [profile.latency_ms[s][b] for s in measured]
        if len(xs) >= 2 and statistics.pvariance(xs) > 0:
            slope, intercept = statistics.linear_regression(xs, ys)
            if slope < 0:
                slope, intercept = 0.0, statistics.fmean(ys)
        else:
            slope, intercept = ys[0] / xs[0] if xs[0] > 0 else 0.0, 0.0
        floor = min(ys)  # no estimate below the fastest measured stitch's time / 2
        for s in missing:
            ms = intercept + slope * menu.rows[s].gflops
            full.setdefault(s, {})[b] = round(max(ms, 0.5 * floor), 4)
    out = LatencyProfile(
        profile.fingerprint, list(batch_sizes), full, profile.repeats, profile.warmup
    )
    return out, frozenset(missing)


def choose_profile(
    s: Settings,
    net: SNNet,
    manifest: Manifest,
    menu: StitchMenu,
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[[], None],
    stop: threading.Event | None,
) -> StartProfile:
    """Steps 1-3 of the module docstring."""
    fp = DeviceFingerprint.current(device, dtype)
    sizes = s.batch_sizes()
    everything = set(range(len(menu)))
    found = manifest.profile_for(fp)
    if found and _measured(found, sizes) >= everything:
        return StartProfile(found, "manifest", frozenset())
    cache = default_cache_path(s, manifest.weights_sha256)
    cached = _read_cache(cache, manifest.weights_sha256)
    mine = next((p for p in cached if p.fingerprint == fp), None)
    if mine is not None and _measured(mine, sizes) >= everything:
        return StartProfile(mine, f"cache {cache}", frozenset())
    have = _measured(mine, sizes) if mine is not None else set()
    todo = [x for x in measurement_order(menu) if x not in have]
    anchors = {r.id for r in menu.rows if len(r.anchors) == 1}
    log.info(
        "latency profile for this device (%s, %s, %d threads): %d of %d stitches in the cache; "
        "measuring the rest at batch sizes %s for up to %g s (anchors always)",
        fp.device_name, fp.dtype, fp.threads, len(have), len(menu), sizes, s.profile_seconds,
    )  # fmt: skip
    profile = LatencyProfile(fp, sizes, {x: dict(mine.latency_ms[x]) for x in have} if mine else {})
    profile.repeats, profile.warmup = s.profile_repeats, 1
    t0 = time.monotonic()
    for i, stitch in enumerate(todo, 1):
        if time.monotonic() - t0 > s.profile_seconds and stitch not in anchors:
            break
        check()
        try:
            one = snnet_core.measure_latency(
                net, [stitch], sizes, warmup=1, repeats=s.profile_repeats, stop=stop
            )
        except InterruptedError:
            check()
            raise
        profile.latency_ms[stitch] = one.latency_ms[stitch]
        if i == len(todo) or i % max(1, len(todo) // 10) == 0:
            log.info("profiling: %d/%d stitches measured (%.0f s)", i, len(todo),
                     time.monotonic() - t0)  # fmt: skip
    measured_now = len(_measured(profile, sizes)) - len(have)
    where = _write_cache(cache, manifest.weights_sha256, cached, profile)
    full, estimated = estimate(profile, menu, sizes)
    if estimated:
        log.info("%d stitches estimated from GFLOPs (corrected online as they run)", len(estimated))
    source = f"measured {measured_now} stitches in {time.monotonic() - t0:.0f} s, {where}"
    if estimated:
        source += f", {len(estimated)} estimated"
    return StartProfile(full, source, estimated)


def _write_cache(
    cache: Path, sha: str, cached: list[LatencyProfile], profile: LatencyProfile
) -> str:
    """Keep what was measured (only that) in the cache; where it went, for the log."""
    profiles = [p for p in cached if p.fingerprint != profile.fingerprint] + [profile]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
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


def calibrate(
    net: SNNet,
    runner: Callable[[torch.Tensor, int], torch.Tensor],
    latency: LatencyModel,
    batch_sizes: list[int],
    check: Callable[[], None],
) -> tuple[float, str]:
    """Time the anchors where the model serves (through ``runner``: the same process layout,
    threads and pipe as requests) against the profile; the device factor to start from, and
    what was found.

    A profile from the manifest or the cache names a CPU model, but on a virtual machine that
    is not an identity: a slower machine with the same name used to inherit a faster one's
    profile. Within ``CALIBRATION_TOLERANCE`` the profile is trusted as it is; otherwise every
    prediction is rescaled by the median ratio (the controller refines it online).
    """
    anchors = [st.id for st in net.stitches if not st.cut]
    ratios = []
    for b in batch_sizes:
        x = torch.zeros(b, *net.input_size)
        for a in anchors:
            times = []
            for _ in range(CALIBRATION_REPEATS):
                check()
                t0 = time.perf_counter()
                runner(x, a)
                times.append((time.perf_counter() - t0) * 1e3)
            ratios.append(statistics.median(times) / latency.base_ms(a, b))
    ratio = statistics.median(ratios)
    spread = f"anchors ran x{min(ratios):.2f}..x{max(ratios):.2f} of the profile here"
    if abs(ratio - 1.0) <= CALIBRATION_TOLERANCE:
        log.info("calibration: %s (median x%.2f): within %.0f%%, profile trusted",
                 spread, ratio, CALIBRATION_TOLERANCE * 100)  # fmt: skip
        return 1.0, f"calibrated x{ratio:.2f}, trusted"
    log.warning("calibration: %s (median x%.2f): outside %.0f%%, every prediction rescaled by it",
                spread, ratio, CALIBRATION_TOLERANCE * 100)  # fmt: skip
    return ratio, f"calibrated x{ratio:.2f}, rescaled"


THREADS_GAIN = 0.15  # all the cores must beat cores - 1 by this much to take the event loop's


def cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_threads(net: SNNet, menu: StitchMenu, repeats: int = 3) -> tuple[int, str]:
    """torch threads for the model on CPU, by measurement: the largest anchor at batch 1 with the
    cores minus one (a core left to the event loop, which parses, decodes and answers) and with
    every core; all the cores only if that is at least ``THREADS_GAIN`` faster. On 2 cores the
    tiny bundled model runs faster on 1 thread, DeiT-Ti about 2x faster on 2."""
    n = cores()
    if n == 1:
        return 1, "1 core"
    anchors = [r for r in menu.rows if len(r.anchors) == 1]
    largest = max(anchors, key=lambda r: r.gflops).id
    p0 = next(net.parameters())
    x = torch.zeros(1, *net.input_size, device=p0.device, dtype=p0.dtype)
    ms = {}
    with torch.inference_mode():
        for k in (n - 1, n):
            torch.set_num_threads(k)
            net(x, largest)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x, largest)
                times.append((time.perf_counter() - t0) * 1e3)
            ms[k] = statistics.median(times)
    pick = n if ms[n] < (1 - THREADS_GAIN) * ms[n - 1] else n - 1
    figures = ", ".join(f"{k} threads {v:.2f} ms" for k, v in ms.items())
    return pick, f"stitch {largest} at batch 1: {figures}"


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
        if not set(acc) >= every or not set(reference) >= every:
            why.append(
                f"{name}: no recorded accuracy for every stitch in it and in float32 "
                f"(snnet eval --dtype {name} --write)"
            )
            continue
        worst = max(reference[s] - acc[s] for s in every)
        if worst > DTYPE_ACCURACY_POINTS:
            why.append(f"{name}: loses up to {worst:.2f} points")
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
        return "float32", f"the only dtype eligible ({why})" if why else "the only dtype eligible"
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
