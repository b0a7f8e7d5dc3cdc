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
front: ``("plan", rid, options, n, payload_bytes, arrived)`` then ``("run", rid, shape, bytes)``
for large images (decoded only once admitted), or ``("admit", rid, options, n, payload_bytes,
arrived, shape, bytes)`` for small ones (decoded first: one round trip instead of two), and
``("done", rid, status, ms, asked)`` (answered, or refused; rid -1 and not asked when refused
before the owner was asked to plan it). The owner answers with ``("plan", rid, plan)``,
``("result", rid, result)`` (``(plan, result)`` for an admit) or ``("refused", rid, status,
detail, retry_after_s)``. ``arrived`` is ``time.monotonic()`` in the front: on Linux the
monotonic clock is one for every process. A front that dies loses only its own requests: the
owner forgets its plans when its connection closes, and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import pickle
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

from .errors import Refusal

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
        try:
            while True:
                try:
                    msg = await _read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the front is gone
                kind, rid = msg[0], msg[1]
                if kind == "plan":
                    self._plan(writer, plans, *msg[1:])
                elif kind in ("run", "admit"):
                    if kind == "admit" and not self._plan(writer, plans, *msg[1:6], reply=False):
                        continue
                    task = asyncio.create_task(
                        self._run(writer, plans, rid, *msg[-2:], with_plan=kind == "admit")
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif kind == "done":
                    self._done(plans.pop(rid, None), *msg[2:])
        finally:
            # Its requests have nobody to answer to: they leave the HTTP backlog; what is
            # queued still runs (the queue's other requests were planned behind it).
            for remote in plans.values():
                remote.release()
            writer.close()

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

    async def _run(self, writer, plans, rid, shape, data, with_plan=False) -> None:
        from .routes.classify import submit

        remote, engine = plans.get(rid), self.life.engine
        if remote is None or engine is None:
            return
        x = torch.from_numpy(np.frombuffer(bytearray(data), dtype=np.float32).reshape(shape))
        try:
            pending = submit(engine, remote.plan, x)
        except Refusal as r:
            plans.pop(rid, None)
            self._send(writer, ("refused", rid, r.status, r.detail, r.retry_after_s))
            return
        finally:
            remote.release()  # queued (or refused): out of the HTTP backlog
        try:
            remote.result = await pending
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
        metrics.request_seconds.labels("/classify").observe(total_ms / 1e3)
        if remote is None:
            return
        remote.release()  # a request whose images did not decode, or one refused
        engine = self.life.engine
        if status == 200 and remote.result is not None and engine is not None:
            engine.record_answer(
                remote.plan, remote.result, remote.n, remote.payload_bytes, total_ms
            )


class _Remote:
    """A front's request at the owner: counted in the HTTP backlog from its plan until queued."""

    def __init__(self, ingress, n: int, payload_bytes: int) -> None:
        self._entered = ingress.entered()
        self._ticket = self._entered.__enter__()
        self.n, self.payload_bytes = n, payload_bytes
        self.plan = None
        self.result = None

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
        env = {**os.environ, "SNNET_HOST": self.host, "SNNET_PORT": str(self.port)}
        args = [sys.executable, "-m", "server.fronts", self.channel, self.http]
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(args, env=env)

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
                    self.procs[i] = self._spawn()
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

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._reading: asyncio.Task | None = None

    async def connect(self) -> None:
        """Connect to the owner's channel: it listens before it starts any front, so a failure
        here is the owner's end (the front exits; the owner, if alive, starts another)."""
        reader, self._writer = await asyncio.open_unix_connection(self.path)
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

    async def _ask(self, rid: int, kind: str, *args):
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        self._writer.write(_frame((kind, rid, *args)))
        msg = await fut
        if msg[0] == "refused":
            _, _, status, detail, retry = msg
            raise Refusal(status, detail, retry)
        return msg[2]

    async def plan(self, options, n: int, payload_bytes: int, arrived: float):
        """(request id, Plan) from the owner's planner; raises its Refusal."""
        rid = next(self._ids)
        return rid, await self._ask(rid, "plan", options, n, payload_bytes, arrived)

    async def run(self, rid: int, x: torch.Tensor):
        """The planned request's Result from the owner's queue; raises its Refusal."""
        return _result(await self._ask(rid, "run", *_tensor(x)))

    async def admit(self, options, payload_bytes: int, arrived: float, x: torch.Tensor):
        """Plan and run in one round trip, for images already decoded: (request id, Plan,
        Result); raises the Refusal of either."""
        rid = next(self._ids)
        plan, result = await self._ask(
            rid, "admit", options, x.shape[0], payload_bytes, arrived, *_tensor(x)
        )
        return rid, plan, _result(result)

    def close(self) -> None:
        """Leave the owner (it forgets this front's plans)."""
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


def _tensor(x: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
    x = x.detach().to(torch.float32).contiguous()
    return tuple(x.shape), x.numpy().tobytes()


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
    owner = OwnerClient(channel)
    proxy = httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=http), base_url="http://owner", timeout=None
    )
    pid = str(os.getpid())

    async def lifespan(app):
        await owner.connect()
        yield
        owner.close()
        await proxy.aclose()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    def decode(images: list[tuple[str, bytes]]) -> torch.Tensor:
        lim = settings
        try:
            decoded = [
                decode_image(
                    d, max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels, name=name
                )  # fmt: skip
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
            req = await parse_classify(request, settings, len(manifest.labels))
            if req.tensor is None and req.payload_bytes <= INLINE_DECODE_BYTES:
                # Small images: decoding them here costs less than a second round trip to the
                # owner; the plan counts the time as spent (a refused one decoded for nothing).
                x = decode(req.images)
                asked = True
                rid, plan, result = await owner.admit(req.options, req.payload_bytes, arrived, x)
            else:  # large ones only once the plan admits them, off the event loop
                asked = True
                rid, plan = await owner.plan(req.options, req.n, req.payload_bytes, arrived)
                x = req.tensor
                if x is None:
                    x = await asyncio.to_thread(decode, req.images)
                result = await owner.run(rid, x)
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
    config = uvicorn.Config(
        create_front_app(channel, http), log_level=settings.log_level,
        access_log=settings.access_log, timeout_graceful_shutdown=settings.shutdown_grace_s,
    )  # fmt: skip
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(sys.argv[1:])
