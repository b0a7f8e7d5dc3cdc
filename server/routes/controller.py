"""The controller's state, for people and dashboards."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..schemas import ControllerState
from .deps import NOT_READY, EngineDep

router = APIRouter()


@router.get(
    "/controller",
    response_model=ControllerState,
    responses=NOT_READY,
    summary="The controller's state: load level, arrival rate, corrections, fleet figures",
)
async def controller(engine: EngineDep) -> Any:
    sched = engine.scheduler
    return {
        **engine.controller.state(),
        "cold_start_ms": round(sched.cold_extra_ms, 3),
        "cold_start_planned_ms": round(sched.cold_planning_ms, 3),
        "cold_start_at_rest_ms": round(sched.cold_at_rest_ms, 3),
    }
