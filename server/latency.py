"""Latency model: predicted compute time per (stitch, batch size), corrected online.

The base is the latency profile measured on this device (median ms at a few batch sizes);
between measured sizes it interpolates linearly, above the largest it extrapolates from the two
largest. Each stitch carries a multiplicative correction, observed / profiled time, so the model
follows the machine when it is slower (or faster) than when it was profiled. Only the controller
sets the corrections, from the service's metrics (``set_correction``; one law, see
``server.controller``).
"""

from __future__ import annotations

import bisect
import threading

from snnet_core import LatencyProfile

MIN_CORRECTION, MAX_CORRECTION = 0.25, 8.0


def _monotone(per_bs: dict[int, float]) -> list[tuple[int, float]]:
    """(batch, ms) sorted by batch, made non-decreasing: a larger batch never takes less time, so
    a noisy measurement below a smaller batch's is raised to it."""
    points, floor = [], 0.0
    for b, ms in sorted((int(b), float(ms)) for b, ms in per_bs.items()):
        floor = max(floor, ms)
        points.append((b, floor))
    return points


class LatencyModel:
    """Thread-safe predictions of compute milliseconds.

    Args:
        profile: Measured medians on this device and dtype.
    """

    def __init__(self, profile: LatencyProfile) -> None:
        self.profile = profile
        self._lock = threading.Lock()
        self._base = {s: _monotone(per_bs) for s, per_bs in profile.latency_ms.items()}
        self._correction = {s: 1.0 for s in self._base}

    def base_ms(self, stitch: int, batch: int) -> float:
        """Profiled time, interpolated in batch size."""
        points = self._base[stitch]
        sizes = [b for b, _ in points]
        i = bisect.bisect_left(sizes, batch)
        if i < len(sizes) and sizes[i] == batch:
            return points[i][1]
        if len(points) == 1:
            return points[0][1] * batch / points[0][0]
        if i == 0:
            (b0, t0), (b1, t1) = points[0], points[1]
        elif i == len(points):
            (b0, t0), (b1, t1) = points[-2], points[-1]
        else:
            (b0, t0), (b1, t1) = points[i - 1], points[i]
        t = t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        return max(t, 0.5 * points[0][1])

    def predict_ms(self, stitch: int, batch: int) -> float:
        return self.base_ms(stitch, batch) * self._correction[stitch]

    def correction(self, stitch: int) -> float:
        return self._correction[stitch]

    def set_correction(self, stitch: int, value: float) -> float:
        """Set one stitch's correction (clamped to a sane range); returns what was set."""
        value = min(max(float(value), MIN_CORRECTION), MAX_CORRECTION)
        with self._lock:
            self._correction[stitch] = value
        return value

    def corrections(self) -> dict[int, float]:
        with self._lock:
            return dict(self._correction)
