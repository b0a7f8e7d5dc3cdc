"""Starting child processes with settings of their own in their environment.

``multiprocessing`` gives a spawned child this process's environment and no other, so the model
child's OpenMP settings (``model_child_env``) are put into ``os.environ`` while it starts and taken
out again. Anything else here that starts a process from a copy of ``os.environ`` (the front
processes, ``server.fronts``) copies it under ``SPAWN_ENV_LOCK``: a front started in that moment
would bind its event loop to one core. A module of its own, light to import: a front process
imports it too, and ``snnet serve`` starts the model process before it imports torch
(``server.early``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from pathlib import Path

SPAWN_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def spawning_with(env: dict[str, str]):
    """Set ``env`` (where not already set) in this process's environment while a child is
    spawned: it inherits it; this process's OpenMP runtime read its own long ago."""
    with SPAWN_ENV_LOCK:
        added = {k: v for k, v in env.items() if k not in os.environ}
        os.environ.update(added)
        try:
            yield
        finally:
            for k in added:
                os.environ.pop(k, None)


def environ_copy(**extra: str) -> dict[str, str]:
    """A copy of this process's own environment (never a child's settings), with ``extra``."""
    with SPAWN_ENV_LOCK:
        return {**os.environ, **extra}


def cpus() -> int:
    """The CPUs this process may run on: its affinity mask (a cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """The CPU time this process's cgroup may use, in CPUs (``docker run --cpus``, a Kubernetes
    CPU limit): the tightest quota of its cgroup and those above it, cgroup v2 (``cpu.max``) or
    v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None where there is none or it cannot be
    read. A container usually sees its own cgroup at ``root`` (a cgroup namespace); where its
    path under ``root`` does not exist, ``root``'s own files are read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one hierarchy
            base, read = Path(root), _v2_quota
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own mount
            mounts = (Path(root) / name for name in (controllers, "cpu", "cpu,cpuacct"))
            base, read = next((m for m in mounts if m.is_dir()), None), _v1_quota
            if base is None:
                continue
        else:
            continue
        here = base / path.lstrip("/")
        if not here.is_dir():
            here = base
        while True:
            quota = read(here)
            if quota is not None:
                quotas.append(quota)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(quotas, default=None)


def _v2_quota(cgroup: Path) -> float | None:
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        if limit == "max":
            return None
        q, p = int(limit), int(period)
    except (OSError, ValueError):
        return None
    return None if q <= 0 or p <= 0 else q / p


def _v1_quota(cgroup: Path) -> float | None:
    try:
        limit = int((cgroup / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if limit <= 0 or period <= 0 else limit / period


def cores() -> int:
    """The cores this process can use at once: its CPUs (``cpus``), or fewer where a CPU quota
    allows less (rounded up: 1.5 CPUs' worth of time is 2 threads' work, each running part of
    the time). A model on 64 threads in a container allowed 2 CPUs spends its time throttled,
    every team waiting at each barrier for threads the quota stopped."""
    return cores_within(cpus(), cpu_quota())


def cores_within(n: int, quota: float | None) -> int:
    """Of ``n`` CPUs, the cores a ``quota`` of CPU time (in CPUs; None: none) lets run at once."""
    return n if quota is None else max(1, min(n, math.ceil(quota - 1e-9)))


def quota_note() -> str:
    """Where a CPU quota makes ``cores`` fewer than ``cpus``, that, in words for a log line."""
    quota, n = cpu_quota(), cpus()
    if quota is None or cores_within(n, quota) >= n:
        return ""
    return f" (a CPU quota of {quota:g} CPU{'' if quota == 1 else 's'} on {n})"


# OpenMP threads of the child spin for a while after each parallel region before they sleep
# (libgomp's default: 300000 spins). Between torch ops that keeps a forward fast, but after a
# batch they went on spinning while the server process decoded the next request on the same
# cores. On 2 cores, a DeiT-Ti/S/B net answering 120 sequential JPEG requests met 88.4% of the
# budgets with the default spin and 96.9% with 10000 spins (`bench/deit_idle.py --requests 120`).
# Too short a spin has its own cliff: on a VM whose idle vCPUs halt, after a second of idle
# the threads fell asleep between the ops of a forward and each hand-off waited: the first
# forwards after a pause ran 2-4x slower at 10000 spins (medium model, batch 8, in one process:
# 36-49 ms against 12), 1.2x at 20000 and up. A longer spin costs under load instead, when the
# spinning thread takes the core the HTTP process needs: under the page's 3 s burst (Chromium
# on the same 2 cores) the server kept up in some runs at 10000 and 20000 spins and never at
# 100000. A client pausing 1 s between requests met 74-82% of budgets at 10000, 85% at 20000,
# 88-91% at 30000, 89-97% at 100000 (`bench/deit_idle.py --requests 40 --think-s 1`;
# bench/RESULTS.md, "An idle gap between requests, and the spin count"). 20000 is past the
# cliff here and no worse under load. The cliff sits at a time, not a count: a value the user
# set wins.
CHILD_ENV = {"GOMP_SPINCOUNT": "20000"}

# One model thread per CPU, bound to it, when the model's threads take every CPU this process
# may use (its affinity mask; a hyperthread is a CPU: OMP_PLACES=threads). Unbound, a thread
# woken on a CPU (the event loop's 5 ms timer, the controller, a kernel thread) pushed an OpenMP
# thread off it, the scheduler sometimes moved that thread onto its team mate's CPU, and the
# whole team waited at the next barrier until it moved back: idle DeiT-Ti/S/B on 2 cores, stitch
# 0 (15 ms) took up to 20-60 ms. Bound, a preempted thread waits only for the short task that
# preempted it (``bench/pinning.py``). Only then: with fewer threads than CPUs, every replica on
# a host would bind its team to the same first CPUs. Any binding the user set is left alone
# (OMP_PROC_BIND=false: unbound).
PIN_ENV = {"OMP_PROC_BIND": "true", "OMP_PLACES": "threads"}
# Any of these set by the user: binding is theirs (libgomp lets OMP_PLACES override
# GOMP_CPU_AFFINITY, so ours must not be added to theirs).
USER_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def model_child_env(threads: int | None) -> dict[str, str]:
    """The OpenMP settings the model process gets for ``threads`` torch threads (where the
    user has not set them): the spin count, and ``PIN_ENV`` when the threads take every CPU
    of the affinity mask (under a CPU quota of fewer, replicas on one host would all bind to
    its first CPUs)."""
    env = dict(CHILD_ENV)
    user_binds = any(k in os.environ for k in USER_BINDING)
    if threads and threads >= cpus() and not user_binds:
        env.update(PIN_ENV)
    return env
