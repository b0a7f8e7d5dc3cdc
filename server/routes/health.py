"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..schemas import HealthResponse, ReadyResponse
from .deps import LifecycleDep

router = APIRouter()


@router.get(
    "/healthz", response_model=HealthResponse, summary="Liveness: the process serves requests"
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Readiness: 503 until the model is loaded, verified and profiled",
    responses={
        503: {
            "model": ReadyResponse,
            "description": "Not ready yet",
            "content": {
                "application/json": {"example": {"ready": False, "detail": "latency profile"}}
            },
        }
    },
)
async def readyz(life: LifecycleDep) -> JSONResponse:
    ready = life.engine is not None
    return JSONResponse({"ready": ready, "detail": life.detail}, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'snnet_requests_total{route="/classify",status="200"} 42.0'
                }
            }
        }
    },
)
async def metrics(request: Request, life: LifecycleDep) -> Response:
    if life.engine is not None:
        wait_ms = life.engine.scheduler.predicted_wait_ms(time.monotonic())
        life.metrics.queue_predicted_wait.set(wait_ms / 1e3)
    return Response(generate_latest(life.metrics.registry), media_type=CONTENT_TYPE_LATEST)
