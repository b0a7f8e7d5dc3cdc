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
import os
import threading

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


def cores() -> int:
    """The cores this process may run on: its affinity mask (a cpuset), not a CPU quota."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
    user has not set them): the spin count, and ``PIN_ENV`` when the threads take every CPU."""
    env = dict(CHILD_ENV)
    user_binds = any(k in os.environ for k in USER_BINDING)
    if threads and threads >= cores() and not user_binds:
        env.update(PIN_ENV)
    return env
