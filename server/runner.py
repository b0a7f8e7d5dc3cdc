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

import contextlib
import gc
import logging
import multiprocessing as mp
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait

import numpy as np
import torch

from snnet_core import SNNet

from . import early
from .cpuwait import RunDelay, thread_wait_ms
from .environ import model_child_env

log = logging.getLogger("snnet.runner")

# How long a child may take to start (import torch and timm, map the weights, warm up).
START_TIMEOUT_S = 300.0
# How long the event loop waits for a model process whose socket ended to exit (a thread waits
# out the rest): a killed child has exited by then.
REAP_ON_LOOP_S = 0.1

# The hop's messages, over a socket pair (AF_UNIX stream): a fixed-size struct each way. The
# parent asks (stitch, ndim, shape padded to 6 dims, payload bytes); the child replies (status,
# rows, classes, forward ms, the ms its threads waited for a CPU meanwhile (their mean,
# ``server.cpuwait``), payload bytes). Payload 0: the tensor is in shared memory.
# Otherwise its raw bytes follow the struct (a batch larger than the shared buffer, logits of
# another shape, an error's text, the ready message's warm-up times). Against
# ``multiprocessing.Connection`` (a pickled tuple, read as a length and then the body), with the
# child answering at once and a 7 ms pause before each round trip as between served requests:
# median 52-60 us (stream), 46-66 us (SOCK_SEQPACKET, not on macOS) against 95-175 us here,
# 3 alternating rounds each; ``bench/model_hop.py`` measures the real runner's hop.
_ASK = struct.Struct("<ii6iq")
_REPLY = struct.Struct("<iiiddq")
_OK, _ERROR, _READY, _IMPORTED = 0, 1, 2, 3
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


def _await(
    sock: socket.socket,
    proc: mp.process.BaseProcess,
    status: int,
    cancelled: threading.Event | None = None,
) -> bytearray | None:
    """The payload of the message ``status`` (``_IMPORTED``, ``_READY``) a starting model
    process sends; RunnerError if it dies, takes over ``START_TIMEOUT_S`` or ``cancelled`` is
    set first (the caller stops it)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    what = "imported torch" if status == _IMPORTED else "warmed up"
    while not wait([sock], 0.05):  # poll(2): select(2) fails on a descriptor past 1023
        if not proc.is_alive():  # died before it could report
            proc.join(5)
            raise RunnerError(
                f"the model process exited during start-up (exit code {proc.exitcode})"
            )
        if cancelled is not None and cancelled.is_set():
            raise RunnerError(f"start-up cancelled before the model process {what}")
        if time.monotonic() > deadline:
            raise RunnerError(f"the model process had not {what} after {START_TIMEOUT_S:g} s")
    try:
        (got, *_), payload = _recv(sock, _REPLY)
    except (EOFError, OSError):
        proc.join(5)
        raise RunnerError(
            f"the model process exited during start-up (exit code {proc.exitcode})"
        ) from None
    if got != status:
        raise RunnerError(f"the model process sent status {got} instead of {status}")
    return payload


def settle_early(cancelled: threading.Event | None = None) -> None:
    """Wait until a model process started early (``server.early``) has imported torch and
    timm: what this process measures next (threads, dtype) must not share the cores with those
    imports (on 2 cores they made 2 threads look slow). If it fails, it is dropped, and
    ``ProcessRunner`` starts another."""
    held = early.held()
    if held is None:
        return
    proc, sock = held
    try:
        _await(sock, proc, _IMPORTED, cancelled)
    except (RunnerError, OSError) as e:
        if not (cancelled is not None and cancelled.is_set()):
            log.warning("the model process started early failed (%s); another starts later", e)
        early.discard()
        return
    early.imported()


# How long a model process that was told to stop (its socket closed) may take to exit before
# it is killed. A test of a stuck process lowers it.
EXIT_WAIT_S = 5.0


def _finish_off(proc: mp.process.BaseProcess, say: bool = False) -> int | None:
    """Wait up to ``EXIT_WAIT_S`` more for a model process to exit, then kill it; its exit
    code (logged if ``say``)."""
    proc.join(EXIT_WAIT_S)
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
        self.last_wait_ms = 0.0  # the ms the calling thread waited for a CPU in it
        if device.type == "cuda":
            shape = (max_batch, *net.input_size)
            self._staging = torch.empty(shape, dtype=torch.float32).pin_memory()

    def __call__(self, x: torch.Tensor, stitch: int) -> torch.Tensor:
        t0 = time.perf_counter()  # (the reads of the wait inside: a call is all "forward")
        w0 = thread_wait_ms()
        with torch.inference_mode():
            if self._staging is not None and x.shape[0] <= self._staging.shape[0]:
                staged = self._staging[: x.shape[0]]
                staged.copy_(x)
                x = staged
            y = self.net(x.to(self.device, non_blocking=True).to(self.dtype), stitch)
            y = y.float().cpu()
        self.last_wait_ms = max(0.0, thread_wait_ms() - w0)
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


# -- the weights' way to the model process ----------------------------------------------------
# Every model process starts with its socket only (``server.early.spawn``: ``snnet serve`` starts
# one before it imports torch) and receives its weights over it: ``_SETUP`` (how many file
# descriptors, how many pickle bytes), the shared tensors' descriptors (SCM_RIGHTS, at most
# ``_FDS_PER_MESSAGE`` a message), then the pickle of (net, threads, dtype, warm-up batch sizes,
# shared buffers). torch pickles a shared tensor as a ``multiprocessing.reduction.DupFd`` of its
# descriptor; while ``_Collect`` is the "spawning popen" (the hook ``multiprocessing``'s own spawn
# uses to pass them at exec), that is a ``_Passed``: the descriptor's place among those sent.
_SETUP = struct.Struct("<iq")
_FDS_PER_MESSAGE = 250  # Linux passes at most 253 a message (SCM_MAX_FD)
_received: dict[int, int] = {}  # the child's copies of the descriptors not yet handed to torch


class _Passed:
    def __init__(self, index: int) -> None:
        self.index = index

    def detach(self) -> int:  # in the child: its copy, which torch maps and closes
        return _received.pop(self.index)


class _Collect:
    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)  # the tensor's own descriptor: open while the tensor lives
        return len(self.fds) - 1

    def DupFd(self, index: int) -> _Passed:  # noqa: N802 (multiprocessing's name)
        return _Passed(index)


def _setup_message(setup: tuple) -> tuple[list[int], bytes]:
    """The descriptors and the pickle that carry ``setup`` to a model process."""
    from multiprocessing import context
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401  (registers torch's pickling of shared tensors)

    collect, before = _Collect(), context.get_spawning_popen()
    context.set_spawning_popen(collect)  # this thread's only
    try:
        data = ForkingPickler.dumps(setup)
    finally:
        context.set_spawning_popen(before)
    return collect.fds, data


def _send_setup(sock: socket.socket, fds: list[int], data: bytes) -> None:
    sock.sendall(_SETUP.pack(len(fds), len(data)))
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"\0"], fds[i : i + _FDS_PER_MESSAGE])
    sock.sendall(data)


def _recv_setup(sock: socket.socket) -> tuple[list[int], bytearray]:
    """The descriptors and the pickle ``_send_setup`` sent (EOFError or OSError: the parent
    went away first)."""
    count, size = _SETUP.unpack(_recv_exact(sock, _SETUP.size))
    ensure_descriptors(count)  # this process started with the parent's limit before it rose
    fds: list[int] = []
    flags = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
    try:
        while len(fds) < count:
            data, got, got_flags, _ = socket.recv_fds(sock, 1, _FDS_PER_MESSAGE, flags)
            fds.extend(got)
            if not data:
                raise EOFError
            if got_flags & socket.MSG_CTRUNC or not got:
                raise RunnerError(
                    f"{len(fds)} of the model's {count} shared tensors reached its process"
                )
        return fds, _recv_exact(sock, size)
    except BaseException:
        _close(fds)
        raise


def _close(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def serve_from_socket(sock: socket.socket) -> None:
    """The model process, once imported (``server.early._host``): say so, receive the weights,
    then ``_serve``; return if the parent goes away first."""
    try:
        _send(sock, _REPLY, _IMPORTED, 0, 0, 0.0, 0.0)
        fds, data = _recv_setup(sock)
    except (EOFError, OSError):
        return
    _received.update(enumerate(fds))
    try:
        setup = pickle.loads(data)  # from our parent, over our socket only
    finally:
        _close(_received.values())  # (none, unless unpickling failed halfway)
        _received.clear()
    _serve(sock, *setup)


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
    if threads:
        torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    net.eval()
    first_ms = _warm_up(net, warm_batch_sizes, torch.device("cpu"), dtype)
    gc.collect()
    gc.freeze()  # as in the server process: no full collections over the model's objects
    inputs, logits = shared
    waits = RunDelay.of_process()  # this process's threads: this one (the forwards') and torch's

    try:
        _send(sock, _REPLY, _READY, 0, 0, 0.0, 0.0, payload=pickle.dumps(first_ms))
        while True:
            (stitch, ndim, *dims, _), data = _recv(sock, _ASK)
            shape = tuple(dims[:ndim])
            try:
                if data is None:
                    x = inputs[: shape[0]]
                else:
                    x = torch.frombuffer(data, dtype=torch.float32).reshape(shape)
                w0, t0 = waits.sample(), time.perf_counter()
                with torch.inference_mode():
                    y = net(x.to(dtype), stitch).float()
                ms = (time.perf_counter() - t0) * 1e3
                waited = waits.waited_ms(w0, waits.sample())  # (its threads' mean)
                y = y.reshape(y.shape[0], -1)
                shared_out = data is None and y.shape[1:] == logits.shape[1:]
                if shared_out:
                    logits[: y.shape[0]].copy_(y)
            except Exception as e:  # the model's error: the batch fails, the child goes on
                text = f"{type(e).__name__}: {e}".encode()[:_MAX_ERROR_BYTES]
                _send(sock, _REPLY, _ERROR, 0, 0, 0.0, 0.0, payload=text)
                continue
            # The answer is sent outside the model's try: a failed send ends the child.
            if shared_out:
                _send(sock, _REPLY, _OK, *y.shape, ms, waited)
            else:
                _send(sock, _REPLY, _OK, *y.shape, ms, waited, payload=y.contiguous().numpy())
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
        self._sock: socket.socket | None = None
        self._proc: mp.process.BaseProcess | None = None
        self.restarts = 0
        self.reaping: threading.Thread | None = None  # a thread killing a child slow to exit
        # The ms the last batch's forward took in the child, without the hop to it and back
        # (``server.profiling.calibrate`` tells the two apart).
        self.last_forward_ms: float | None = None
        self.last_wait_ms = 0.0  # the ms the child's threads waited for a CPU in it (mean)
        self._start()

    def _start(self) -> None:
        t0 = time.perf_counter()
        env = model_child_env(self.threads)
        setup = (
            self.net, self.threads, self.dtype, self.warm_batch_sizes, (self._inputs, self._logits)
        )  # fmt: skip
        message = _setup_message(setup)
        taken = early.take(env)  # started before this process imported torch, if it was
        if taken is not None:
            proc, sock, imported = taken
            try:
                if not imported:
                    _await(sock, proc, _IMPORTED, self._cancelled)
                _send_setup(sock, *message)
            except (RunnerError, OSError) as e:
                early.stop(proc, sock)
                if self._cancelled.is_set():
                    raise
                log.warning("the model process started early failed (%s); starting another", e)
                taken = None
        if taken is None:
            proc, sock = early.spawn(env)
            try:
                _await(sock, proc, _IMPORTED, self._cancelled)
                _send_setup(sock, *message)
            except OSError as e:
                early.stop(proc, sock)
                raise RunnerError(f"could not hand the model to its process: {e}") from None
            except BaseException:
                early.stop(proc, sock)
                raise
        try:
            payload = _await(sock, proc, _READY, self._cancelled)
            first_ms = pickle.loads(payload)  # from our own child, over a socket only it holds
        except BaseException:
            early.stop(proc, sock)
            raise
        self.first_ms: dict[int, float] = first_ms
        self._sock, self._proc = sock, proc
        self.bound = "OMP_PROC_BIND" in env
        self.early = taken is not None
        log.info(
            "model process %d ready (%.1fs%s; %s%s)", proc.pid, time.perf_counter() - t0,
            ", started early" if self.early else "",
            "default threads" if not self.threads
            else "1 thread" if self.threads == 1 else f"{self.threads} threads",
            ", one bound to each CPU" if self.bound else "",
        )  # fmt: skip

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __call__(self, x: torch.Tensor, stitch: int) -> torch.Tensor:
        if self._sock is None:
            self._start()
        try:
            self.send(x, stitch)
            y, self.last_forward_ms, self.last_wait_ms = self._answer()
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
            y, self.last_forward_ms, self.last_wait_ms = self._answer()
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

    def _answer(self) -> tuple[torch.Tensor, float, float]:
        """The child's answer to the batch sent: its logits, the ms its forward took there and
        the ms its threads waited for a CPU meanwhile, or its error raised as a RunnerError.
        EOFError or OSError: the child is gone."""
        (status, rows, classes, ms, waited, _), payload = _recv(self._sock, _REPLY)
        if status == _ERROR:
            raise RunnerError(bytes(payload or b"").decode(errors="replace"))
        if payload is None:
            return torch.from_numpy(self._logits.numpy()[:rows].copy()), ms, waited
        logits = torch.frombuffer(payload, dtype=torch.float32).reshape(rows, classes)
        return logits, ms, waited

    def _reap(self, wait_s: float | None = None) -> int | None:
        """Close the socket (the child reads its end and returns) and collect the child's exit
        code. One still running after ``wait_s`` is killed, here if ``wait_s`` is the full
        ``EXIT_WAIT_S`` (None), else by a thread (``reaping``), and None is returned: the event
        loop's path (``finish``) must not stall every request for a child slow to exit."""
        proc, self._proc = self._proc, None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if proc is None:
            return None
        proc.join(EXIT_WAIT_S if wait_s is None else wait_s)
        if not proc.is_alive():
            return proc.exitcode
        if wait_s is not None:
            self.reaping = threading.Thread(
                target=_finish_off, args=(proc, True), name="snnet-reap", daemon=True
            )
            self.reaping.start()
            return None
        return _finish_off(proc)

    def close(self) -> None:
        self._reap()
