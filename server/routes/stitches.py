"""The stitch menu on this device."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from snnet_core import StitchRow, UnknownStitch
from snnet_core.space import short_names

from ..engine import Engine
from ..errors import Refusal
from ..schemas import ErrorResponse, StitchesResponse, StitchInfo
from .deps import NOT_READY, EngineDep

router = APIRouter()
BAD_PARAM = {422: {"model": ErrorResponse, "description": "A parameter of the wrong type."}}


def _info(engine: Engine, row: StitchRow) -> dict:
    # The batch sizes this server runs: a profile cache kept from a start with a larger
    # SNNET_MAX_BATCH_SIZE has more, which no request here can get.
    most = engine.settings.max_batch_size
    measured = {b: ms for b, ms in engine.profile.latency_ms.get(row.id, {}).items() if b <= most}
    return StitchInfo(
        id=row.id,
        description=row.description,
        anchors=list(row.anchors),
        gflops=row.gflops,
        params_m=row.params_m,
        accuracy=row.accuracy,
        latency_ms={str(b): ms for b, ms in sorted(measured.items())},
        measured=row.id not in engine.estimated,
        predicted_ms={
            str(b): round(engine.latency.predict_ms(row.id, b), 4) for b in sorted(measured)
        },
        pareto=row.id in engine.menu.pareto,
    ).model_dump()


@router.get(
    "/stitches",
    response_model=StitchesResponse,
    responses={**NOT_READY, **BAD_PARAM},
    summary="The stitch menu on this device",
)
async def list_stitches(
    engine: EngineDep,
    pareto: Annotated[bool, Query(description="Only the accuracy/GFLOPs Pareto front.")] = False,
) -> Any:
    rows = [r for r in engine.menu.rows if not pareto or r.id in engine.menu.pareto]
    anchors = engine.manifest.config.anchors
    short = short_names([a.name for a in anchors])
    return {
        "model": engine.model_name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "profile": engine.profile_source,
        "anchors": [
            {"name": a.name, "short_name": s, "display_name": a.title}
            for a, s in zip(anchors, short, strict=True)
        ],
        "stitches": [_info(engine, r) for r in rows],
    }


@router.get(
    "/stitches/{stitch_id}",
    response_model=StitchInfo,
    responses={
        404: {"model": ErrorResponse, "description": "No such stitch."},
        **NOT_READY,
        **BAD_PARAM,
    },
    summary="One stitch",
)
async def get_stitch(
    stitch_id: Annotated[int, Path(description="Stitch id.")], engine: EngineDep
) -> Any:
    try:
        return _info(engine, engine.menu.row(stitch_id))
    except UnknownStitch as e:
        raise Refusal(404, str(e)) from None
