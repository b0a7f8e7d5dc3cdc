"""Where the model runs: in the scheduler's worker thread, or in a child process of its own.

The scheduler hands a runner one batch at a time: ``runner(x, stitch)`` takes float32 images on
the CPU and returns float32 logits on the CPU.

Why a process: a forward of a small network is a few hundred torch ops, and the thread that
runs it needs the GIL back after every one. On CPU the event loop holds the GIL while it parses
and answers requests, so under load the model thread waits for it again and again: batches ran
2-3x slower than profiled with four clients on two cores (``bench/worker.py`` measures this).
A child process has its own interpreter, so the model only competes for cores, not for the GIL.
The weights are not copied: they are moved to shared memory and the child maps the same pages.
A batch and its logits cross in shared memory too; a socket carries only fixed-size messages
(``_ASK``, ``_REPLY``), with the tensor as raw bytes behind them when it does not fit there.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

import numpy as np
import torch

from snnet_core import SNNet

from .environ import spawning_with
from .profiling import cores

log = logging.getLogger("snnet.runner")

# How long a child may take to start (import torch and timm, map the weights, warm up).
START_TIMEOUT_S = 300.0
# How long the event loop waits for a model process whose socket ended to exit (a thread waits
# out the rest): a killed child has exited by then.
REAP_ON_LOOP_S = 0.1

# The hop's messages, over a socket pair (AF_UNIX stream): a fixed-size struct each way. The
# parent asks (stitch, ndim, shape padded to 6 dims, payload bytes); the child replies (status,
# rows, classes, forward ms, payload bytes). Payload 0: the tensor is in shared memory.
# Otherwise its raw bytes follow the struct (a batch larger than the shared buffer, logits of
# another shape, an error's text, the ready message's warm-up times). Against
# ``multiprocessing.Connection`` (a pickled tuple, read as a length and then the body), with the
# child answering at once and a 7 ms pause before each round trip as between served requests:
# median 52-60 us (stream), 46-66 us (SOCK_SEQPACKET, not on macOS) against 95-175 us here,
# 3 alternating rounds each; ``bench/model_hop.py`` measures the real runner's hop.
_ASK = struct.Struct("<ii6iq")
_REPLY = struct.Struct("<iiidq")
_OK, _ERROR, _READY = 0, 1, 2
_MAX_DIMS = 6
_MAX_ERROR_BYTES = 1 << 16


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """The next ``n`` bytes from ``sock`` (EOFError if the peer went away first)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def _send(sock: socket.socket, fmt: struct.Struct, *fields, payload=b"") -> None:
    """One message: the struct (its last field the payload's size), then the payload."""
    view = memoryview(payload).cast("B")
    sock.sendall(fmt.pack(*fields, view.nbytes))
    if view.nbytes:
        sock.sendall(view)


def _recv(sock: socket.socket, fmt: struct.Struct) -> tuple[tuple, bytearray | None]:
    """One message ``_send`` sent: its fields (the payload's size last) and its payload, if any."""
    fields = fmt.unpack(_recv_exact(sock, fmt.size))
    return fields, (_recv_exact(sock, fields[-1]) if fields[-1] else None)


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


# Open files beyond the model's shared tensors: connections, the HTTP fronts, libraries.
FD_HEADROOM = 1024


def ensure_descriptors(tensors: int) -> None:
    """Make room for ``tensors`` shared tensors among this process's open files.

    torch shares a CPU tensor between processes as an open file descriptor (its default
    strategy on Linux), held by this process and the model's for as long as the tensor lives:
    the bundled net takes 257, a DeiT-Ti/S/B SN-Net 500, and a common soft limit is 1024,
    past which sharing fails with "Too many open files" or connections are refused later.
    The soft limit is raised (up to the hard one) to the files open now, the tensors and
    FD_HEADROOM, at least 4096; RunnerError if the hard limit leaves no room for the tensors (the
    fix is the user's: ``ulimit -n``)."""
    import torch.multiprocessing

    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    if torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return  # file_system (macOS's default): no descriptor per tensor
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = _open_files()
    want = open_now + tensors + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    unlimited = hard == resource.RLIM_INFINITY
    if not unlimited and hard < open_now + tensors + 64:
        raise RunnerError(
            f"the model's {tensors} tensors are shared with its process as open files; this "
            f"process may open at most {hard} (raise it to {want} or more: ulimit -n {want}, "
            "or LimitNOFILE in systemd)"
        )
    new = max(want, 4096) if unlimited else min(hard, max(want, 4096))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError) as e:  # e.g. macOS: above kern.maxfilesperproc
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, new, e)
        return
    log.info(
        "open-file limit raised from %d to %d (the model's %d shared tensors)", soft, new, tensors
    )
    if new < want:
        log.warning(
            "only %d open files are left for connections once the model's %d tensors are "
            "shared (raise the hard limit: ulimit -n %d)", new - open_now - tensors, tensors, want,
        )  # fmt: skip


def _open_files() -> int:
    """How many files this process has open (0 where the system does not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(listing))
        except OSError:
            continue
    return 0


def model_child_env(threads: int | None) -> dict[str, str]:
    """The OpenMP settings the model process gets for ``threads`` torch threads (where the
    user has not set them): the spin count, and ``PIN_ENV`` when the threads take every CPU."""
    env = dict(CHILD_ENV)
    user_binds = any(k in os.environ for k in USER_BINDING)
    if threads and threads >= cores() and not user_binds:
        env.update(PIN_ENV)
    return env


def _finish_off(proc: mp.process.BaseProcess, say: bool = False) -> int | None:
    """Wait up to 5 s more for a model process to exit, then kill it; its exit code (logged
    if ``say``)."""
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    if say:
        log.warning("the model process %d that died has exited (exit code %s)", proc.pid,
                    proc.exitcode)  # fmt: skip
    return proc.exitcode


class RunnerError(RuntimeError):
    """The model failed on a batch, or its process died; the batch's requests get a 500."""


class InlineRunner:
    """Runs the model in the calling thread (the scheduler's worker).

    On CUDA a batch is staged in pinned (page-locked) host memory, so its copy to the device is
    a real asynchronous DMA rather than a copy through a bounce buffer; the logits come back
    with ``.cpu()``, which waits for the device, so the time a batch takes (and what the
    latency model learns from) includes all of its GPU work. Calls are serialised (one worker),
    and each ends with that wait, so the staging buffer is never overwritten while in flight.

    Args:
        net: The SN-Net, already on ``device`` in ``dtype``.
        device: Where it runs.
        dtype: Its parameters' dtype; inputs are cast to it on the device.
        max_batch: Largest batch the scheduler sends (sizes the staging buffer; larger batches
            are copied unstaged).
    """

    kind = "thread"

    def __init__(
        self, net: SNNet, device: torch.device, dtype: torch.dtype, max_batch: int = 8
    ) -> None:
        self.net, self.device, self.dtype = net, device, dtype
        self._staging: torch.Tensor | None = None
        self.first_ms: dict[int, float] = {}  # from warm_up
        self.last_forward_ms: float | None = None  # the last call's ms (no hop: all forward)
        if device.type == "cuda":
            shape = (max_batch, *net.input_size)
            self._staging = torch.empty(shape, dtype=torch.float32).pin_memory()

    def __call__(self, x: torch.Tensor, stitch: int) -> torch.Tensor:
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self._staging is not None and x.shape[0] <= self._staging.shape[0]:
                staged = self._staging[: x.shape[0]]
                staged.copy_(x)
                x = staged
            y = self.net(x.to(self.device, non_blocking=True).to(self.dtype), stitch)
            y = y.float().cpu()
        self.last_forward_ms = (time.perf_counter() - t0) * 1e3
        return y

    def warm_up(self, batch_sizes: Sequence[int], check: Callable[[], None] = lambda: None) -> None:
        self.first_ms = _warm_up(self.net, batch_sizes, self.device, self.dtype, check)

    def close(self) -> None:
        pass


def warmed(net: SNNet, batch_sizes: Sequence[int]) -> set[tuple[int, int]]:
    """The (stitch, batch size) pairs ``_warm_up`` runs: the anchors at each size, every stitch
    at the smallest."""
    anchors = {s.id for s in net.stitches if not s.cut}
    smallest = min(batch_sizes)
    every = {(s.id, smallest) for s in net.stitches}
    return every | {(a, b) for a in anchors for b in batch_sizes}


def _warm_up(
    net: SNNet,
    batch_sizes: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
    check: Callable[[], None] = lambda: None,
) -> dict[int, float]:
    """Run each (stitch, batch size) of ``warmed`` once, the anchors first at each size: the
    anchors at every batch size and every other stitch at the smallest. The first call at a new
    shape is slow (kernel selection, allocations), and a slow first batch would skew the
    latency corrections. A stitch runs the anchors' own blocks at the same
    shapes, so the anchors warm them for it; only its small stitching layer is new. (Every
    stitch at every size took 34.5 s of a DeiT-Ti/S/B start here, for nothing more.) ``check``
    runs before each forward (it raises to stop early).

    Returns the ms each stitch other than an anchor took at the smallest size, after the
    anchors ran at it: one timed run of each, free (``server.profiling.rescale_estimates``)."""
    anchors = {s.id for s in net.stitches if not s.cut}
    smallest = min(batch_sizes)
    pairs = warmed(net, batch_sizes)
    first_ms: dict[int, float] = {}
    with torch.inference_mode():
        for b in sorted(set(batch_sizes)):
            x = torch.zeros(b, *net.input_size, device=device, dtype=dtype)
            ids = sorted((i for i, size in pairs if size == b), key=lambda i: (i not in anchors, i))
            for i in ids:  # the anchors first: they warm the shapes every other stitch runs at
                check()
                if device.type == "cuda":  # a first CUDA call loads modules, picks kernels
                    net(x, i)
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                net(x, i)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if b == smallest and i not in anchors:
                    first_ms[i] = (time.perf_counter() - t0) * 1e3
    return first_ms


def _serve(
    sock: socket.socket,
    net: SNNet,
    threads: int | None,
    dtype: torch.dtype,
    warm_batch_sizes: Sequence[int],
    shared: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """The child: warm up, report ready, then answer each batch (see ``_ASK``) until the parent
    closes its end or goes away. A batch without payload is the first rows of ``shared[0]``;
    its logits go to ``shared[1]`` where they fit."""
    # Ctrl-C reaches the whole process group. The parent drains what it accepted before it
    # stops, and needs this process for that: only the parent ends it (closing its socket).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    net.eval()
    first_ms = _warm_up(net, warm_batch_sizes, torch.device("cpu"), dtype)
    gc.collect()
    gc.freeze()  # as in the server process: no full collections over the model's objects
    inputs, logits = shared

    try:
        _send(sock, _REPLY, _READY, 0, 0, 0.0, payload=pickle.dumps(first_ms))
        while True:
            (stitch, ndim, *dims, _), data = _recv(sock, _ASK)
            shape = tuple(dims[:ndim])
            try:
                if data is None:
                    x = inputs[: shape[0]]
                else:
                    x = torch.frombuffer(data, dtype=torch.float32).reshape(shape)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    y = net(x.to(dtype), stitch).float()
                ms = (time.perf_counter() - t0) * 1e3
                y = y.reshape(y.shape[0], -1)
                shared_out = data is None and y.shape[1:] == logits.shape[1:]
                if shared_out:
                    logits[: y.shape[0]].copy_(y)
            except Exception as e:  # the model's error: the batch fails, the child goes on
                text = f"{type(e).__name__}: {e}".encode()[:_MAX_ERROR_BYTES]
                _send(sock, _REPLY, _ERROR, 0, 0, 0.0, payload=text)
                continue
            # The answer is sent outside the model's try: a failed send ends the child.
            if shared_out:
                _send(sock, _REPLY, _OK, *y.shape, ms)
            else:
                _send(sock, _REPLY, _OK, *y.shape, ms, payload=y.contiguous().numpy())
    except (EOFError, OSError):  # the parent closed its end or is gone
        return


class ProcessRunner:
    """Runs the model in a child process (CPU only); restarts the child if it dies.

    Args:
        net: The SN-Net on the CPU, in eval mode. Its tensors are moved to shared memory.
        dtype: The dtype the net is in (inputs are cast to it in the child).
        threads: torch threads in the child (None: torch's default).
        warm_batch_sizes: Batch sizes at which the child runs every stitch once before it
            reports ready.
        cancelled: Set to give up waiting for the child to start (it is killed); start-up
            stops at once instead of after the warm-up.
        max_batch: The largest batch that crosses to the child by shared memory (larger ones
            go through the socket as bytes).
    """

    kind = "process"

    def __init__(
        self,
        net: SNNet,
        dtype: torch.dtype,
        threads: int | None,
        warm_batch_sizes: Sequence[int] = (1,),
        cancelled: threading.Event | None = None,
        max_batch: int = 8,
    ) -> None:
        if next(net.parameters()).device.type != "cpu":
            raise ValueError("ProcessRunner runs CPU models only; use InlineRunner on a GPU")
        self.net, self.dtype, self.threads = net, dtype, threads
        self.warm_batch_sizes = list(warm_batch_sizes)
        self._cancelled = cancelled or threading.Event()
        ensure_descriptors(sum(1 for _ in net.parameters()) + sum(1 for _ in net.buffers()) + 2)
        net.share_memory()
        # A batch and its logits cross in shared memory, one batch at a time (the scheduler
        # sends the next only once this one is answered); the socket carries (stitch, shape)
        # and (shape, ms). A DeiT image (0.6 MB) through a pipe as bytes took 0.8 ms there and
        # back here, a batch of 8 3-9 ms: copies, pickling and 64 KB writes.
        self._inputs = torch.empty(max_batch, *net.input_size).share_memory_()
        self._logits = torch.empty(max_batch, net.num_classes).share_memory_()
        self._ctx = mp.get_context("spawn")
        self._sock: socket.socket | None = None
        self._proc: mp.process.BaseProcess | None = None
        self.restarts = 0
        self.reaping: threading.Thread | None = None  # a thread killing a child slow to exit
        # The ms the last batch's forward took in the child, without the hop to it and back
        # (``server.profiling.calibrate`` tells the two apart).
        self.last_forward_ms: float | None = None
        self._start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        # torch.multiprocessing registers the pickling of tensors as shared-memory handles.
        import torch.multiprocessing  # noqa: F401

        parent, child = socket.socketpair()
        proc = self._ctx.Process(
            target=_serve, name="snnet-model", daemon=True,
            args=(child, self.net, self.threads, self.dtype, self.warm_batch_sizes,
                  (self._inputs, self._logits)),
        )  # fmt: skip
        env = model_child_env(self.threads)
        try:
            try:
                with spawning_with(env):
                    proc.start()
            finally:
                child.close()
            first_ms = self._await_ready(parent, proc)
        except BaseException:
            parent.close()
            raise
        self.first_ms: dict[int, float] = first_ms
        self._sock, self._proc = parent, proc
        self.bound = "OMP_PROC_BIND" in env
        log.info(
            "model process %d ready (%.1fs; %s threads%s)", proc.pid, time.perf_counter() - t0,
            self.threads or "default", ", one bound to each CPU" if self.bound else "",
        )  # fmt: skip

    def _await_ready(self, sock: socket.socket, proc: mp.process.BaseProcess) -> dict[int, float]:
        """The child's warm-up times, once it reports ready; RunnerError if it dies, does not
        start in time, or start-up is cancelled (it is killed then)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not wait([sock], 0.05):  # poll(2): select(2) fails on a descriptor past 1023
            if not proc.is_alive():  # died before it could even report
                proc.join(5)
                raise RunnerError(
                    f"the model process exited during start-up (exit code {proc.exitcode})"
                )
            if self._cancelled.is_set() or time.monotonic() > deadline:
                proc.kill()
                proc.join(5)
                if self._cancelled.is_set():
                    raise RunnerError("start-up cancelled while the model process warmed up")
                raise RunnerError(f"the model process did not start within {START_TIMEOUT_S:g} s")
        try:
            (status, *_), payload = _recv(sock, _REPLY)
        except (EOFError, OSError):
            proc.join(5)
            raise RunnerError(
                f"the model process exited during start-up (exit code {proc.exitcode})"
            ) from None
        try:
            if status != _READY:
                raise RunnerError(f"the model process sent status {status} instead of ready")
            return pickle.loads(payload)  # from our own child, over a socketpair only it holds
        except Exception:
            proc.kill()
            proc.join(5)
            raise

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __call__(self, x: torch.Tensor, stitch: int) -> torch.Tensor:
        if self._sock is None:
            self._start()
        try:
            self.send(x, stitch)
            y, self.last_forward_ms = self._answer()
        except (EOFError, OSError):  # (BrokenPipeError is an OSError)
            code = self._reap()
            self.restarts += 1
            log.error("the model process died (exit code %s); starting a new one", code)
            try:
                self._start()
            except (RunnerError, OSError):
                log.exception("could not restart the model process; trying again on the next batch")
            raise RunnerError(
                f"the model process died (exit code {code}) while running stitch {stitch}; "
                "a new one serves the next batches"
            ) from None
        return y

    # Started and finished apart, for the scheduler's event-loop path (``Scheduler.submit``):
    # ``send`` a batch, wait until ``fileno()`` is readable, then ``finish``.

    @property
    def ready(self) -> bool:
        """The child is running (a batch may be sent without starting one first)."""
        return self._sock is not None

    def shares(self, x: torch.Tensor) -> bool:
        """Whether batch ``x`` crosses by shared memory (the socket then carries one message)."""
        return x.shape[0] <= self._inputs.shape[0] and x.shape[1:] == self._inputs.shape[1:]

    def send(self, x: torch.Tensor, stitch: int) -> None:
        """Hand the child a batch without waiting for its answer. Raises OSError if it is gone."""
        x = x.detach().to("cpu", torch.float32)
        if x.ndim > _MAX_DIMS:
            raise ValueError(f"a batch has at most {_MAX_DIMS} dimensions, not {x.ndim}")
        dims = (*x.shape, *(0,) * (_MAX_DIMS - x.ndim))
        if self.shares(x):
            # numpy's copy runs in this thread: a torch copy this size would wake this
            # process's OpenMP team, whose spinning then takes the cores from the child's
            # (a DeiT-Ti forward 30% slower behind a 2-thread parent here).
            np.copyto(self._inputs.numpy()[: x.shape[0]], x.numpy())
            _send(self._sock, _ASK, stitch, x.ndim, *dims)
        else:
            _send(self._sock, _ASK, stitch, x.ndim, *dims, payload=x.contiguous().numpy())

    def fileno(self) -> int:
        return self._sock.fileno()

    def finish(self, stitch: int) -> torch.Tensor:
        """The logits of the batch ``send`` handed over; RunnerError if the model failed on it or
        its process died (then the next ``__call__`` starts a new one, off the event loop)."""
        try:
            y, self.last_forward_ms = self._answer()
        except (EOFError, OSError):
            code = self._reap(wait_s=REAP_ON_LOOP_S)  # on the event loop: do not wait long
            self.restarts += 1
            how = "still exiting" if code is None else f"exit code {code}"
            log.error("the model process died (%s); the next batch starts one", how)
            raise RunnerError(
                f"the model process died ({how}) while running stitch {stitch}; "
                "a new one serves the next batches"
            ) from None
        return y

    def _answer(self) -> tuple[torch.Tensor, float]:
        """The child's answer to the batch sent: its logits and the ms its forward took there,
        or its error raised as a RunnerError. EOFError or OSError: the child is gone."""
        (status, rows, classes, ms, _), payload = _recv(self._sock, _REPLY)
        if status == _ERROR:
            raise RunnerError(bytes(payload or b"").decode(errors="replace"))
        if payload is None:
            return torch.from_numpy(self._logits.numpy()[:rows].copy()), ms
        return torch.frombuffer(payload, dtype=torch.float32).reshape(rows, classes), ms

    def _reap(self, wait_s: float = 5.0) -> int | None:
        """Close the socket (the child reads its end and returns) and collect the child's exit
        code. One still running after ``wait_s`` is killed, here if ``wait_s`` is the full 5 s,
        else by a thread (``reaping``), and None is returned: the event loop's path
        (``finish``) must not stall every request for a child slow to exit."""
        proc, self._proc = self._proc, None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if proc is None:
            return None
        proc.join(wait_s)
        if not proc.is_alive():
            return proc.exitcode
        if wait_s < 5.0:
            self.reaping = threading.Thread(
                target=_finish_off, args=(proc, True), name="snnet-reap", daemon=True
            )
            self.reaping.start()
            return None
        return _finish_off(proc)

    def close(self) -> None:
        self._reap()
