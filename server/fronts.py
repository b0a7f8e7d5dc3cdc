"""More HTTP processes in front of one model owner (``SNNET_API_WORKERS=N``).

Reading, parsing, decoding and answering a request take CPU per request in the process that
serves its HTTP; one event loop holds one core. With N workers the port is served by N
processes (``SO_REUSEPORT``: the kernel spreads connections over them):

- the **owner** is the server of one worker: it holds the Engine (the model, the one EDF queue,
  the planner, the controller and the metrics) and serves HTTP on the port like any worker;
- N - 1 **front** processes (``python -m server.fronts``) serve ``POST /classify`` themselves:
  they parse a request, ask the owner for its plan (so a plan sees the whole queue, whichever
  worker received the request), decode its images, send the tensor to the owner, which queues
  it and sends back the logits, and answer. Every other route is passed to the owner's own
  HTTP server on a Unix socket.

Between a front and the owner: one Unix-socket connection per front, frames of a 4-byte length
and a pickle (both ends are this package, on one machine, under one user). Messages from a
front: ``("plan", rid, options, n, payload_bytes, arrived)`` then ``("run", rid, shape, data)``
for large images (decoded only once admitted), or ``("admit", rid, options, n, payload_bytes,
arrived, shape, data)`` for small ones (decoded first: one round trip instead of two), and
``("done", rid, status, ms, asked)`` (answered, or refused; rid -1 and not asked when refused
before the owner was asked to plan it), and ``("gone", rid)`` when the HTTP client of a run or
admit closed its connection before the answer (its images leave the queue if they still wait
there, as with the owner's own requests; the owner still answers the run or admit, the front
then counts status 499). The owner answers with ``("plan", rid, plan)``,
``("result", rid, result)`` (``(plan, result)`` for an admit) or ``("refused", rid, status,
detail, retry_after_s)``.

Tensors cross by shared memory: each front maps an ``Arena`` (a file in /dev/shm, which the
owner maps too and then unlinks, announced first with ``("arena", -1, path, size)`` and
acknowledged with ``("arena", -1, ok)``), writes a request's float32 images there, and sends
their offset as ``data``; the owner queues a tensor over those very pages, with no copy, and
the front frees them when the answer (or a refusal) comes back: by then the batch has run, or
the request has left the queue unrun. For
a tensor under SHARED_MIN_BYTES, or when a front has no arena (no /dev/shm) or no room in it,
``data`` is the tensor's bytes. ``arrived`` is ``time.monotonic()`` in the front: on Linux the
monotonic clock is one for every process. A front that dies loses only its own requests: the
owner forgets its plans when its connection closes (what of them still waits in the queue
leaves it: nobody would read the answer), and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import math
import mmap
import os
import pickle
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .environ import environ_copy
from .errors import Refusal
from .routes.classify import CLIENT_GONE, GONE_DETAIL, client_went

log = logging.getLogger("snnet.fronts")

_LEN = struct.Struct("!I")
WORKER_HEADER = "x-snnet-worker"  # which process answered (its pid): for tests and debugging


async def _read(reader: asyncio.StreamReader):
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(size))


def _frame(msg) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port that other processes may bind too (``SO_REUSEPORT``).
    Not listening yet: uvicorn listens once the app has started, and only then does the kernel
    give this process connections (a front still importing torch would hold them for seconds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


# -- the owner's side ---------------------------------------------------------------------------


class OwnerChannel:
    """The owner's end: serves the fronts' plan and run requests against its Engine.

    Args:
        life: The owner's Lifecycle (its engine is None until start-up is done: then every plan
            is a 503, as for the owner's own routes).
    """

    def __init__(self, life) -> None:
        self.life = life

    async def serve(self, path: str) -> asyncio.AbstractServer:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return await asyncio.start_unix_server(self._connection, path=path)

    async def _connection(self, reader, writer) -> None:
        plans: dict[int, _Remote] = {}
        tasks: set[asyncio.Task] = set()
        arena: mmap.mmap | None = None  # the front's, once announced (its tensors point in it)
        try:
            while True:
                try:
                    msg = await _read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the front is gone
                kind, rid = msg[0], msg[1]
                if kind == "arena":
                    arena = _map_arena(*msg[2:])
                    self._send(writer, ("arena", -1, arena is not None))
                elif kind == "plan":
                    self._plan(writer, plans, *msg[1:])
                elif kind in ("run", "admit"):
                    if kind == "admit" and not self._plan(writer, plans, *msg[1:6], reply=False):
                        continue
                    task = asyncio.create_task(
                        self._run(writer, plans, rid, *msg[-2:], arena, with_plan=kind == "admit")
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif kind == "done":
                    self._done(plans.pop(rid, None), *msg[2:])
                elif kind == "gone":
                    remote = plans.get(rid)
                    if remote is not None:
                        remote.gone = True
                        self._withdraw(remote)
        finally:
            # Its requests have nobody to answer to: they leave the HTTP backlog, and what
            # still waits in the queue leaves it.
            for remote in plans.values():
                remote.release()
                remote.gone = True  # (a run not yet started queues nothing)
                self._withdraw(remote)
            writer.close()

    def _withdraw(self, remote: _Remote) -> None:
        """Take a request out of the queue if it still waits there (one a batch has taken runs
        on: its images, in the front's arena, are freed when its answer is back)."""
        engine, pending = self.life.engine, remote.pending
        if engine is not None and pending is not None and engine.scheduler.withdraw(pending):
            remote.withdrawn = True

    def _send(self, writer, msg) -> None:
        if not writer.is_closing():
            writer.write(_frame(msg))

    def _plan(self, writer, plans, rid, options, n, payload_bytes, arrived, reply=True) -> bool:
        """Plan a front's request; whether it was admitted (else its refusal is sent)."""
        from .routes.classify import plan_request

        engine = self.life.engine
        if engine is None:
            self._send(writer, ("refused", rid, 503, f"model not ready: {self.life.detail}", 5))
            return False
        engine.metrics.arrivals.inc()
        remote = _Remote(engine.ingress, n, payload_bytes)  # in the HTTP backlog until queued
        try:
            remote.plan = plan_request(engine, options, n, payload_bytes, arrived)
        except Refusal as r:
            remote.release()
            self._send(writer, ("refused", rid, r.status, r.detail, r.retry_after_s))
            return False
        plans[rid] = remote
        if reply:
            self._send(writer, ("plan", rid, remote.plan))
        return True

    async def _run(self, writer, plans, rid, shape, data, arena, with_plan=False) -> None:
        from .routes.classify import submit

        remote, engine = plans.get(rid), self.life.engine
        if remote is None or engine is None:
            return
        if remote.gone:  # (its client went before its images came)
            remote.release()
            self._send(writer, ("refused", rid, CLIENT_GONE, GONE_DETAIL, None))
            return
        if isinstance(data, int):  # an offset in the front's arena: a view, no copy
            count = math.prod(shape)
            x = torch.frombuffer(arena, dtype=torch.float32, count=count, offset=data).view(shape)
            engine.metrics.front_tensors.labels("shared_memory").inc()
        else:
            x = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.float32).reshape(shape))
            engine.metrics.front_tensors.labels("socket").inc()
        try:
            pending = submit(engine, remote.plan, x)
        except Refusal as r:
            plans.pop(rid, None)
            self._send(writer, ("refused", rid, r.status, r.detail, r.retry_after_s))
            return
        finally:
            remote.release()  # queued (or refused): out of the HTTP backlog
        remote.pending = pending
        try:
            remote.result = await pending
        except asyncio.CancelledError:
            if not remote.withdrawn:  # (this task cancelled: the server stops)
                raise
            self._send(writer, ("refused", rid, CLIENT_GONE, GONE_DETAIL, None))
            return
        except Exception as e:  # the model failed on its batch
            plans.pop(rid, None)
            self._send(writer, ("refused", rid, 500, str(e), None))
            return
        # Logits as a NumPy array: pickling a torch tensor and back took 145 us here, 10 us.
        wire = dataclasses.replace(remote.result, logits=remote.result.logits.numpy())
        self._send(writer, ("result", rid, (remote.plan, wire) if with_plan else wire))

    def _done(self, remote: _Remote | None, status: int, total_ms: float, asked: bool) -> None:
        """A front answered a request (``remote``: its plan here, if it is still held;
        ``asked``: whether the owner was asked to plan it, and so counted its arrival): the
        HTTP metrics the owner's middleware keeps for its own requests, and an answer's
        evidence for the metrics, the HTTP estimates and the margin."""
        metrics = self.life.metrics
        if not asked:  # refused before planning (401, 400, 413, 415, 422 fields): still arrived
            metrics.arrivals.inc()
        metrics.requests.labels("/classify", str(status)).inc()
        metrics.request_seconds.labels("/classify", str(status)).observe(total_ms / 1e3)
        if remote is None:
            return
        remote.release()  # a request whose images did not decode, or one refused
        engine = self.life.engine
        gone = status == CLIENT_GONE and engine is not None and remote.plan is not None
        if gone and time.monotonic() >= remote.plan.deadline:  # (a missed budget, as unanswered)
            engine.record_unanswered(remote.plan)
        if status == 200 and remote.result is not None and engine is not None:
            engine.record_answer(
                remote.plan, remote.result, remote.n, remote.payload_bytes, total_ms
            )


def _map_arena(path: str, size: int) -> mmap.mmap | None:
    """The owner maps a front's arena, then unlinks its file: the pages live while either
    process maps them, and nothing is left in /dev/shm whichever of the two dies first."""
    if not os.path.basename(path).startswith(ARENA_PREFIX):
        return None
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        log.warning("cannot map a front's arena %s (%s): its tensors come by socket", path, e)
        return None


ARENA_PREFIX = "snnet-front-"
ARENA_BYTES = 32 * 1024 * 1024  # per front: 53 224x224 RGB images in flight
# Smaller tensors go by socket: it costs less than the arena's copy and book-keeping there
# (`python bench/front_tensors.py --size S`, both ends' CPU per image, socket vs shared memory:
# 3x28x28 24 vs 39 us, 3x64x64 39 vs 39 us, 3x96x96 76 vs 50 us, 3x224x224 656 vs 110 us).
SHARED_MIN_BYTES = 32 * 1024
_ALIGN = 64


class Arena:
    """A front's shared memory for the tensors it sends the owner: a file in ``directory``
    (tmpfs), mapped here and, once announced, by the owner; first-fit allocation with
    neighbouring free blocks merged. Space is reserved when it is made (``posix_fallocate``):
    a /dev/shm too small (a container's default is 64 MB) fails here, with a warning, and the
    tensors then go by socket, instead of a SIGBUS on a later write."""

    def __init__(self, path: str, size: int, mm: mmap.mmap) -> None:
        self.path, self.size, self.mm = path, size, mm
        self._free: list[list[int]] = [[0, size]]  # [offset, size], by offset
        self._used: dict[int, int] = {}

    @classmethod
    def create(cls, size: int = ARENA_BYTES, directory: str = "/dev/shm") -> Arena | None:
        path = os.path.join(directory, f"{ARENA_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            log.warning("no shared memory for tensors (%s): they go to the owner by socket", e)
            return None
        try:
            os.posix_fallocate(fd, 0, size)
            return cls(path, size, mmap.mmap(fd, size))
        except OSError as e:
            log.warning(
                "no room for a %d MiB tensor arena in %s (%s): tensors go to the owner by "
                "socket", size >> 20, directory, e,
            )  # fmt: skip
            os.unlink(path)
            return None
        finally:
            os.close(fd)

    def put(self, x: torch.Tensor) -> int | None:
        """Copy ``x`` (float32) into the arena: its offset, or None if there is no room."""
        a = x.detach().to(torch.float32).contiguous().numpy()
        offset = self.alloc(a.nbytes)
        if offset is not None:
            np.frombuffer(self.mm, np.float32, a.size, offset)[:] = a.reshape(-1)
        return offset

    def alloc(self, nbytes: int) -> int | None:
        need = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        for i, (offset, size) in enumerate(self._free):
            if size >= need:
                if size == need:
                    del self._free[i]
                else:
                    self._free[i] = [offset + need, size - need]
                self._used[offset] = need
                return offset
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        i = next((k for k, (o, _) in enumerate(self._free) if o > offset), len(self._free))
        self._free.insert(i, [offset, size])
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:  # the next block
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # the previous one
            self._free[i - 1][1] += self._free.pop(i)[1]

    @property
    def used(self) -> int:
        return sum(self._used.values())

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):  # the owner unlinks it once mapped
            os.unlink(self.path)


class _Remote:
    """A front's request at the owner: counted in the HTTP backlog from its plan until queued."""

    def __init__(self, ingress, n: int, payload_bytes: int) -> None:
        self._entered = ingress.entered(payload_bytes)
        self._ticket = self._entered.__enter__()
        self.n, self.payload_bytes = n, payload_bytes
        self.plan = None
        self.result = None
        self.pending: asyncio.Future | None = None  # its Result, once queued
        self.gone = False  # its HTTP client closed its connection
        self.withdrawn = False  # taken out of the queue unrun

    def release(self) -> None:
        if self._entered is not None:
            self._ticket.queued()
            self._entered.__exit__(None, None, None)
            self._entered = None


class Fronts:
    """Starts the front processes, restarts one that dies, stops them on shutdown.

    Args:
        count: Front processes (the API workers besides the owner).
        host, port: The TCP address they share with the owner.
        channel: The owner's Unix socket for plans and tensors.
        http: The owner's Unix socket for every other route.
    """

    def __init__(self, count: int, host: str, port: int, channel: str, http: str) -> None:
        self.count, self.host, self.port = count, host, port
        self.channel, self.http = channel, http
        self.procs: list[subprocess.Popen] = []
        self._stopping = False

    def _spawn(self) -> subprocess.Popen:
        # (not the model child's OpenMP settings, if it is starting just now: server.environ)
        env = environ_copy(SNNET_HOST=self.host, SNNET_PORT=str(self.port))
        args = [sys.executable, "-m", "server.fronts", self.channel, self.http]
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(args, env=env)

    def pids(self) -> list[int | None]:
        """Each front's pid by slot, ``None`` for one that has exited (until its restart)."""
        return [p.pid if p.returncode is None else None for p in self.procs]

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]
        log.info("%d front processes: %s", self.count, [p.pid for p in self.procs])

    async def supervise(self, period_s: float = 0.5) -> None:
        """Restart a front that died: killed, or crashed. One that exited cleanly was told to
        stop (Ctrl-C reaches the whole process group before this process stops them). A poll
        every ``period_s``: the fronts are plain child processes, and a restart within half a
        second is soon enough (their requests are lost either way)."""
        while not self._stopping:
            for i, p in enumerate(self.procs):
                if p.poll() not in (None, 0) and not self._stopping:
                    log.error("front process %d exited (code %s); starting another", p.pid,
                              p.returncode)  # fmt: skip
                    # in a thread: a model child starting now holds the environment's lock
                    self.procs[i] = await asyncio.to_thread(self._spawn)
            await asyncio.sleep(period_s)

    def stop(self, grace_s: float) -> None:
        """SIGTERM each front (it answers what it accepted, as uvicorn drains), then wait."""
        self._stopping = True
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


# -- a front's side -----------------------------------------------------------------------------


class OwnerClient:
    """A front's connection to the owner; many requests in flight, matched by id."""

    def __init__(self, path: str, arena: Arena | None = None) -> None:
        self.path, self.arena = path, arena
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._reading: asyncio.Task | None = None

    async def connect(self) -> None:
        """Connect to the owner's channel: it listens before it starts any front, so a failure
        here is the owner's end (the front exits; the owner, if alive, starts another)."""
        reader, self._writer = await asyncio.open_unix_connection(self.path)
        if self.arena is not None:
            self._writer.write(_frame(("arena", -1, self.arena.path, self.arena.size)))
            if not (await _read(reader))[2]:  # the owner could not map it: by socket
                self.arena.close()
                self.arena = None
        self._reading = asyncio.create_task(self._read_loop(reader))

    async def _read_loop(self, reader) -> None:
        try:
            while True:
                msg = await _read(reader)
                fut = self._waiting.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        # The owner is gone: whatever waits fails, and this process ends (the owner's end is
        # the server's end; a restarted owner starts new fronts).
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_result(("refused", -1, 503, "the model owner process is gone", 1))
        os.kill(os.getpid(), signal.SIGTERM)

    async def _ask(self, rid: int, kind: str, *args, receive=None):
        """The owner's answer to a message; with ``receive`` (the HTTP request's), a client that
        disconnects first is told to the owner, whose answer is still awaited (it frees the
        request's pages in the arena), and the request ends as CLIENT_GONE."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._writer.write(_frame((kind, rid, *args)))
        if receive is not None and await client_went(receive, fut):
            self.tell("gone", rid)
            await fut
            raise Refusal(CLIENT_GONE, GONE_DETAIL)
        msg = await fut
        if msg[0] == "refused":
            _, _, status, detail, retry = msg
            raise Refusal(status, detail, retry)
        return msg[2]

    async def plan(self, options, n: int, payload_bytes: int, arrived: float):
        """(request id, Plan) from the owner's planner; raises its Refusal."""
        rid = next(self._ids)
        return rid, await self._ask(rid, "plan", options, n, payload_bytes, arrived)

    async def run(self, rid: int, x: torch.Tensor, receive=None):
        """The planned request's Result from the owner's queue; raises its Refusal (499 if
        the client of ``receive``, its HTTP request's, goes first)."""
        with self._sent(x) as data:
            return _result(await self._ask(rid, "run", tuple(x.shape), data, receive=receive))

    def new_id(self) -> int:
        return next(self._ids)

    async def admit(
        self, rid: int, options, payload_bytes: int, arrived: float, x: torch.Tensor, receive=None
    ):
        """Plan and run in one round trip, for images already decoded, as request ``rid``
        (``new_id``: the caller holds it, for the "done" it tells whatever happens): (Plan,
        Result); raises the Refusal of either (499 as ``run``)."""
        with self._sent(x) as data:
            plan, result = await self._ask(
                rid, "admit", options, x.shape[0], payload_bytes, arrived, tuple(x.shape), data,
                receive=receive,
            )  # fmt: skip
        return plan, _result(result)

    @contextlib.contextmanager
    def _sent(self, x: torch.Tensor):
        """What a message carries for ``x``: its offset in the arena, held until the answer is
        back (the owner's batch has run by then), or its bytes (small, no arena, or no room)."""
        small = x.numel() * 4 < SHARED_MIN_BYTES
        offset = None if self.arena is None or small else self.arena.put(x)
        if offset is None:
            yield x.detach().to(torch.float32).contiguous().numpy().tobytes()
            return
        try:
            yield offset
        finally:
            self.arena.free(offset)

    def close(self) -> None:
        """Leave the owner (it forgets this front's plans)."""
        if self.arena is not None:
            self.arena.close()
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()

    def tell(self, kind: str, rid: int, *args) -> None:
        """A message with no answer."""
        if not self._writer.is_closing():
            self._writer.write(_frame((kind, rid, *args)))


def _result(wire):
    return dataclasses.replace(wire, logits=torch.from_numpy(wire.logits))


def create_front_app(channel: str, http: str):
    """A front's FastAPI app: ``POST /classify`` here, every other route at the owner."""
    import httpx

    from snnet_core import StitchMenu, read_manifest

    from .config import get_settings
    from .imaging import ImageError, decode_image, make_transform
    from .parsing import parse_classify
    from .routes.classify import INLINE_DECODE_BYTES, answer, probabilities

    settings = get_settings()
    manifest = read_manifest(settings.weights)
    menu = StitchMenu.of(manifest.stitches)
    transform = make_transform(manifest.preprocessing)
    owner = OwnerClient(channel, Arena.create())
    proxy = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=http), base_url="http://owner", timeout=None
    )
    pid = str(os.getpid())

    async def lifespan(app):
        await owner.connect()
        log.info(
            "front %s: tensors to the owner by %s", pid,
            f"shared memory ({owner.arena.size >> 20} MiB)" if owner.arena else "socket",
        )  # fmt: skip
        yield
        owner.close()
        await proxy.aclose()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    def decode(images: list[tuple[str, bytes]]) -> torch.Tensor:
        lim = settings
        try:
            decoded = [
                decode_image(
                    d,
                    max_bytes=lim.max_image_bytes,
                    max_pixels=lim.max_image_pixels,
                    name=name,
                    work_pixels=transform.work_pixels,
                )
                for name, d in images
            ]
        except ImageError as e:
            raise Refusal(e.status, e.detail) from None
        return transform.batch(decoded)

    def error(status: int, detail: str, retry=None) -> JSONResponse:
        headers = {"Retry-After": str(retry)} if retry else {}
        return JSONResponse({"detail": detail}, status, headers={**headers, WORKER_HEADER: pid})

    @app.post("/classify")
    async def classify(request: Request):
        arrived = time.monotonic()
        rid, asked = -1, False  # no plan yet; not yet counted at the owner
        key = settings.api_key
        try:
            given = request.headers.get("x-api-key", "").encode()
            if key is not None and not hmac.compare_digest(given, key.encode()):
                raise Refusal(401, "missing or wrong X-API-Key header")
            req = await parse_classify(
                request, settings, len(manifest.labels), transform.work_pixels
            )
            if req.tensor is None and req.payload_bytes <= INLINE_DECODE_BYTES:
                # Small images: decoding them here costs less than a second round trip to the
                # owner; the plan counts the time as spent (a refused one decoded for nothing).
                x = decode(req.images)
                asked, rid = True, owner.new_id()
                plan, result = await owner.admit(
                    rid, req.options, req.payload_bytes, arrived, x, request.receive
                )
            else:  # large ones only once the plan admits them, off the event loop
                asked = True
                rid, plan = await owner.plan(req.options, req.n, req.payload_bytes, arrived)
                x = req.tensor
                if x is None:
                    x = await asyncio.to_thread(decode, req.images)
                result = await owner.run(rid, x, request.receive)
        except Refusal as r:
            owner.tell("done", rid, r.status, (time.monotonic() - arrived) * 1e3, asked)
            return error(r.status, r.detail, r.retry_after_s)
        probs = probabilities(result)
        total_ms = (time.monotonic() - arrived) * 1e3
        owner.tell("done", rid, 200, total_ms, True)
        met = total_ms + settings.network_ms <= plan.budget_ms
        body = answer(
            manifest.labels, menu.rows[plan.stitch], req.options.top_k, probs, plan, result,
            total_ms, met,
        )  # fmt: skip
        return JSONResponse(body, headers={WORKER_HEADER: pid})

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS"])
    async def to_owner(request: Request, path: str):
        body = await request.body()
        headers = [
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS | {"host"}
        ]
        r = await proxy.request(
            request.method, request.url.path, params=request.url.query or None,
            headers=headers, content=body,
        )  # fmt: skip
        out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP_HEADERS}
        return Response(r.content, r.status_code, headers={**out, WORKER_HEADER: pid})

    return app


_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


def main(argv: list[str]) -> None:
    import uvicorn

    from .config import get_settings

    channel, http = argv[0], argv[1]
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sock = listen_socket(settings.host, settings.port)
    config = uvicorn.Config(create_front_app(channel, http), **settings.uvicorn_options())
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
