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
        "cold_start_ratio": round(sched.cold_ratio, 4),
        "cold_start_factor": round(sched.cold_planning_factor, 4),
    }
