"""The FastAPI application: routes, error handling, request metrics, start-up and drain.

The Engine is built in a worker thread after the server listens (``server.engine.Lifecycle``),
so ``/healthz`` answers at once and ``/readyz`` is 503 until the model is loaded, verified,
warmed up and profiled. On shutdown (SIGTERM: uvicorn stops accepting and lets in-flight
requests finish) the scheduler drains what it accepted before the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import Settings, get_settings
from .engine import Lifecycle
from .errors import ComputeError, Refusal
from .fronts import Fronts, OwnerChannel
from .ingress import ARRIVED, Ingress
from .metrics import Metrics
from .routes import router
from .routes.page import WEB

log = logging.getLogger("snnet.server")

DESCRIPTION = """
Serve a Stitchable Neural Network: each request names a latency budget and gets the most
accurate stitch whose predicted queue wait + compute fits it under the current load.

* `POST /classify`: images as multipart `image` parts or base64 JSON; optional
  `latency_budget_ms`, `stitch_id`, `max_gflops`, `top_k`. Every request passes the same
  admission: it is answered within its budget without making an accepted request late, or
  refused at once (503 with Retry-After).
* `GET /stitches`: the menu (cost, accuracy, measured latency on this device, Pareto front).
"""


class RequestMetrics:
    """Pure ASGI middleware: requests by route template and status, and their duration.

    (Starlette's ``@app.middleware("http")`` wraps every request in extra tasks and streams;
    this costs a fraction of that on the hot path.)
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # When the request reached the app: handlers count their budget from here, so what
        # routing and dependencies take is inside the time the server reports and predicts.
        scope[ARRIVED] = time.monotonic()
        status = 500

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route, str(status)).observe(
                time.perf_counter() - start
            )


def _on_exit_signals(hook) -> Callable[[], None]:
    """Call ``hook`` (then the handler already there: uvicorn's, which starts its HTTP drain) on
    SIGTERM and SIGINT; returns what puts the handlers back. Only in the main thread, where a
    server runs (signals cannot be handled elsewhere, e.g. an app under a test client)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(sig, frame) -> None:
        hook()
        previous = before[sig]
        if callable(previous):
            previous(sig, frame)
        elif previous == signal.SIG_DFL:
            signal.default_int_handler(sig, frame) if sig == signal.SIGINT else sys.exit(143)

    for sig in before:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, previous in before.items():
            if signal.getsignal(sig) is handler:  # (uvicorn puts its originals back itself)
                signal.signal(sig, previous)

    return restore


DOCS_ASSETS = "/docs-assets"


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc from assets shipped in a package (fastapi-offline's), not
    FastAPI's default CDN: in an air-gapped cluster the default /docs page is blank."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from starlette.responses import HTMLResponse

    assets = files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png",
        )  # fmt: skip

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API docs",
            redoc_js_url=f"{root}{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png", with_google_fonts=False,
        )  # fmt: skip


async def _prepare_routes(app: FastAPI) -> None:
    """FastAPI builds a router's request-parsing state (a pydantic adapter per field of each
    route) when the first request enters that router: on the 2-core VM the first V2 inference
    of a fresh server took 13-16 ms more than the next ones (`python bench/first_request.py`),
    inside its budget, with the event loop stalled meanwhile. One request through the router
    that matches no route (a 404, before the middleware: no metrics) builds them all first."""
    path = "/.snnet-prepare-routes"
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [], "client": None, "server": None, "state": {},
    }  # fmt: skip

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    await app.router(scope, receive, send)


def create_app(settings: Settings | None = None, fronts: Fronts | None = None) -> FastAPI:
    """The service's app. With ``fronts`` (``SNNET_API_WORKERS`` > 1) it is the model owner:
    it also serves the front processes' channel and starts, watches and stops them."""
    settings = settings or get_settings()
    metrics = Metrics()
    metrics.slo_target.set(settings.slo_target)
    ingress = Ingress()
    life = Lifecycle(settings, metrics, ingress)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        grpc_server = None
        if settings.grpc_port:
            from . import grpc_v2  # grpcio only when the gRPC endpoint is on

            grpc_server = await grpc_v2.start(
                life, settings.host, settings.grpc_port, settings.max_body_bytes + 64 * 1024
            )
        await _prepare_routes(app)
        life.start_in_background()
        watching = asyncio.create_task(ingress.watch_loop_lag())
        controlling = asyncio.create_task(life.run_controller())
        channel = supervising = None
        if fronts is not None:
            channel = await OwnerChannel(life).serve(fronts.channel)
            fronts.start()
            metrics.front_pids = fronts.pids  # their CPU and memory in /metrics
            supervising = asyncio.create_task(fronts.supervise())
        draining: list[asyncio.Future] = []
        began = []  # (once: the first signal, or the lifespan's end)

        def drain_the_others() -> None:
            """Stop the gRPC endpoint and the fronts taking new requests and let them answer
            what they accepted, at once and together, from the first SIGTERM or Ctrl-C: after
            uvicorn's own HTTP drain, as before, they took new calls meanwhile, and the stages
            one after another could outlast Kubernetes' grace period (a SIGKILL mid-drain)."""
            if began:
                return
            began.append(True)
            grace = settings.shutdown_grace_s
            if fronts is not None:
                supervising.cancel()
                draining.append(asyncio.ensure_future(asyncio.to_thread(fronts.stop, grace)))
            if grpc_server is not None:
                draining.append(asyncio.ensure_future(grpc_server.stop(grace)))

        loop = asyncio.get_running_loop()
        restore = _on_exit_signals(lambda: loop.call_soon_threadsafe(drain_the_others))
        try:
            yield
        finally:
            restore()
        drain_the_others()  # (also when the lifespan ends without a signal)
        # Both still need this process's model: it drains last.
        for failed in await asyncio.gather(*draining, return_exceptions=True):
            if isinstance(failed, BaseException):  # (the model still drains below)
                log.error("stopping the gRPC endpoint or the fronts failed", exc_info=failed)
        if channel is not None:
            channel.close()
        watching.cancel()
        controlling.cancel()
        await life.shutdown()

    app = FastAPI(
        title="snnet-serve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # served below from local assets, not a CDN
    )  # fmt: skip
    app.state.lifecycle = life
    app.include_router(router)
    _offline_docs(app)
    # The page's script and stylesheet (GET / serves its HTML, server/routes/page.py).
    app.mount("/ui", StaticFiles(directory=str(WEB)), name="ui")

    def error(request: Request, detail: str, status: int, headers=None) -> JSONResponse:
        # One shape per protocol: {"detail": ...} as FastAPI's own, {"error": ...} under /v2 as
        # the Open Inference Protocol says.
        key = "error" if request.url.path.startswith("/v2") else "detail"
        return JSONResponse({key: detail}, status_code=status, headers=headers)

    @app.exception_handler(Refusal)
    async def refused(request: Request, exc: Refusal) -> JSONResponse:
        return error(request, exc.detail, exc.status, exc.headers)

    @app.exception_handler(ComputeError)
    async def compute_failed(request: Request, exc: ComputeError) -> JSONResponse:
        return error(request, str(exc), 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error(request, "; ".join(parts), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, str(exc.detail), exc.status_code, exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(request, f"internal error: {type(exc).__name__}", 500)

    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
