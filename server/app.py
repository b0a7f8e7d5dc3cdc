"""The FastAPI application: liveness and readiness around one loaded SN-Net checkpoint."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI
from fastapi.responses import JSONResponse

import snnet_core

from .config import Settings, get_settings

log = logging.getLogger("snnet.server")


@dataclass
class ModelState:
    """What readiness reports: set once the checkpoint is loaded and verified."""

    ready: bool = False
    detail: str = "loading"
    manifest: snnet_core.Manifest | None = None
    net: snnet_core.SNNet | None = field(default=None, repr=False)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = ModelState()

    def load() -> None:
        net, manifest = snnet_core.load(settings.weights)
        state.net, state.manifest = net, manifest
        state.ready, state.detail = True, "ready"
        log.info("loaded %s: %d stitches", settings.weights, len(manifest.stitches))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(load)
        yield

    app = FastAPI(title="snnet-serve", version="0.1.0", lifespan=lifespan)
    app.state.model = state

    @app.get("/healthz", summary="Liveness: the process serves requests")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 503 until the model is loaded and verified")
    async def readyz() -> JSONResponse:
        code = 200 if state.ready else 503
        return JSONResponse({"ready": state.ready, "detail": state.detail}, status_code=code)

    return app
