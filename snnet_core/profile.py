"""What each stitch costs: parameters, GFLOPs, and measured latency on a device.

GFLOPs are multiply-adds (one per multiply-accumulate, the convention of fvcore and of the
SN-Net paper), counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts two FLOPs
per multiply-add; we halve it). Costs are counted once per part (each anchor's stem, units and
head, and each stitching layer) and summed per route, so counting all stitches costs one forward
pass per anchor.
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .snnet import SNNet


@dataclass(frozen=True)
class StitchCost:
    gflops: float  # multiply-adds per image, 1e9
    params_m: float  # parameters the route uses, 1e6


def _attention_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(q k^T) v: two batched matmuls, 2 FLOPs per multiply-add."""
    b, h, sq, d = q_shape
    sk, dv = k_shape[-2], v_shape[-1]
    return 2 * b * h * sq * sk * d + 2 * b * h * sq * sk * dv


# FlopCounterMode knows the CUDA attention kernels but not the fused CPU one timm's attention
# dispatches to; without this, attention matmuls would be missing from CPU counts.
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _attention_flops


def _macs(fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        out = fn()
    return counter.get_total_flops() // 2, out


def _numel(modules: Iterable[nn.Module]) -> int:
    seen: set[int] = set()
    total = 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


@torch.no_grad()
def stitch_costs(net: SNNet) -> list[StitchCost]:
    """Parameters and GFLOPs (multiply-adds, batch 1) of every stitch, in id order."""
    was_training = net.training
    net.eval()
    try:
        p0 = next(net.parameters())
        x = torch.zeros(1, *net.input_size, device=p0.device, dtype=p0.dtype)
        parts = []  # per anchor: (stem, [unit...], head) as (macs, params) and features
        for m, ad in zip(net.anchors, net.adapters, strict=True):
            units = list(ad.units(m))
            stem_macs, h = _macs(lambda m=m, ad=ad: ad.stem(m, x))
            feats, unit_cost = [h], []
            for u in units:
                c, h = _macs(lambda u=u, h=h: u(h))
                unit_cost.append((c, _numel([u])))
                feats.append(h)
            head_macs, _ = _macs(lambda m=m, ad=ad, h=h: ad.head(m, h))
            head_params = _numel(ad.head_modules(m))
            stem_params = _numel([m]) - head_params - sum(p for _, p in unit_cost)
            parts.append(((stem_macs, stem_params), unit_cost, (head_macs, head_params), feats))

        costs = []
        for s in net.stitches:
            if s.is_anchor:
                (sm, sp), units, (hm, hp), _ = parts[s.anchors[0]]
                macs = sm + sum(c for c, _ in units) + hm
                params = sp + sum(p for _, p in units) + hp
            else:
                a, b = s.anchors
                j, k = s.cut
                (sm, sp), fu, _, feats = parts[a]
                _, bu, (hm, hp), _ = parts[b]
                layer = net.stitch_layers[s.pair][s.layer]
                lm, _ = _macs(lambda layer=layer, f=feats[j + 1]: layer(f))
                macs = sm + sum(c for c, _ in fu[: j + 1]) + lm + sum(c for c, _ in bu[k:]) + hm
                params = (
                    sp
                    + sum(p for _, p in fu[: j + 1])
                    + _numel([layer])
                    + sum(p for _, p in bu[k:])
                    + hp
                )
            costs.append(StitchCost(macs / 1e9, params / 1e6))
        return costs
    finally:
        net.train(was_training)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class DeviceFingerprint:
    """What a latency measurement depends on; profiles are reused only on an equal fingerprint."""

    device_type: str  # "cpu" or "cuda"
    device_name: str  # CPU model or GPU name
    torch: str
    threads: int  # torch intra-op threads (CPU) or SM count (CUDA)
    dtype: str  # "float32", "bfloat16", "float16"

    @classmethod
    def current(cls, device: torch.device | str, dtype: torch.dtype) -> DeviceFingerprint:
        device = torch.device(device)
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            name, threads = props.name, int(props.multi_processor_count)
        else:
            name, threads = _cpu_name(), torch.get_num_threads()
        return cls(device.type, name, torch.__version__, threads, str(dtype).removeprefix("torch."))

    @property
    def key(self) -> str:
        raw = "|".join(str(v) for v in asdict(self).values())
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class LatencyProfile:
    """Median latency per stitch and batch size, measured on one device fingerprint."""

    fingerprint: DeviceFingerprint
    batch_sizes: list[int]
    latency_ms: dict[int, dict[int, float]] = field(default_factory=dict)  # stitch -> bs -> ms
    repeats: int = 0
    warmup: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": asdict(self.fingerprint),
            "key": self.fingerprint.key,
            "batch_sizes": list(self.batch_sizes),
            "repeats": self.repeats,
            "warmup": self.warmup,
            # JSON object keys are strings.
            "latency_ms": {
                str(s): {str(b): ms for b, ms in per_bs.items()}
                for s, per_bs in sorted(self.latency_ms.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyProfile:
        return cls(
            DeviceFingerprint(**d["fingerprint"]),
            [int(b) for b in d["batch_sizes"]],
            {
                int(s): {int(b): float(ms) for b, ms in per_bs.items()}
                for s, per_bs in d["latency_ms"].items()
            },
            int(d.get("repeats", 0)),
            int(d.get("warmup", 0)),
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    net: SNNet,
    stitch_ids: Sequence[int] | None = None,
    batch_sizes: Sequence[int] = (1,),
    *,
    warmup: int = 2,
    repeats: int = 5,
    progress: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> LatencyProfile:
    """Median wall time of ``net(x, stitch_id)`` per stitch and batch size.

    Runs on the device and in the dtype of ``net``'s parameters, in eval mode: ``warmup``
    untimed calls, then the median of ``repeats`` timed ones (device synchronised).

    Args:
        net: The SN-Net, already on its device and dtype.
        stitch_ids: Stitches to measure (default: all).
        batch_sizes: Batch sizes to measure.
        warmup: Untimed calls before timing.
        repeats: Timed calls; the median is kept.
        progress: Print a progress bar (tqdm) to stderr.
        on_progress: Called with (measurements done, total) after each one (e.g. to log).
        stop: When set, the measurement ends before the next forward.

    Raises:
        InterruptedError: ``stop`` was set.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    p0 = next(net.parameters())
    device, dtype = p0.device, p0.dtype
    ids = (
        list(range(len(net.stitches)))
        if stitch_ids is None
        else [net.stitch(i).id for i in stitch_ids]
    )
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    was_training = net.training
    net.eval()
    profile = LatencyProfile(DeviceFingerprint.current(device, dtype), sizes, {}, repeats, warmup)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.randn(b, *net.input_size, generator=gen).to(device, dtype) for b in sizes}
    jobs = [(s, b) for s in ids for b in sizes]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="latency", unit="run", file=sys.stderr)
    try:
        for done, (s, b) in enumerate(jobs, 1):
            x = inputs[b]
            for _ in range(warmup):
                net(x, s)
            _sync(device)
            times = []
            for _ in range(repeats):
                if stop is not None and stop.is_set():
                    raise InterruptedError(
                        f"latency measurement stopped after {done - 1} of {len(jobs)}"
                    )
                t0 = time.perf_counter()
                net(x, s)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            profile.latency_ms.setdefault(s, {})[b] = round(statistics.median(times), 4)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stitch=s, bs=b, ms=f"{profile.latency_ms[s][b]:.1f}")
            if on_progress is not None:
                on_progress(done, len(jobs))
    finally:
        if bar is not None:
            bar.close()
        net.train(was_training)
    return profile


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: cost as low and score as high, one strictly.

    Use ``(gflops, accuracy)`` for the accuracy/FLOPs front, or ``(latency, accuracy)`` for
    the front on a device. Returned in order of increasing cost.
    """
    if len(costs) != len(scores):
        raise ValueError(f"{len(costs)} costs but {len(scores)} scores")
    order = sorted(range(len(costs)), key=lambda i: (costs[i], -scores[i]))
    front, best = [], float("-inf")
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return front
