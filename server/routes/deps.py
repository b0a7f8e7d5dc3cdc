"""The dependencies routes are given: the Engine, or a 503 from this one place until it exists."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..engine import Engine, Lifecycle
from ..errors import Refusal
from ..schemas import ErrorResponse


async def get_lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


def engine_of(request: Request) -> Engine:
    """The Engine, or a 503 with Retry-After while start-up is still under way (or failed)."""
    life: Lifecycle = request.app.state.lifecycle
    if life.engine is None:
        raise Refusal(503, f"model not ready: {life.detail}", 5)
    return life.engine


async def get_engine(request: Request) -> Engine:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    return engine_of(request)


EngineDep = Annotated[Engine, Depends(get_engine)]
LifecycleDep = Annotated[Lifecycle, Depends(get_lifecycle)]

NOT_READY = {503: {"model": ErrorResponse, "description": "Not ready yet (see Retry-After)."}}
