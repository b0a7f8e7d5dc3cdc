"""POST /classify: parse -> plan -> decode -> submit -> encode."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from snnet_core import StitchRow

from ..engine import Engine
from ..errors import Refusal
from ..imaging import ImageError, decode_image
from ..ingress import ARRIVED
from ..parsing import ClassifyRequest, parse_classify
from ..planner import Plan
from ..scheduler import Result
from ..schemas import (
    DIGIT_PNG_B64,
    ClassifyJSON,
    ClassifyOptions,
    ClassifyResponse,
    ErrorResponse,
    multipart_schema,
)
from .deps import engine_of

router = APIRouter()

CLIENT_GONE = 499  # the status counted for a request whose client went away (nginx's code)
GONE_DETAIL = "the client closed its connection before the answer"

# Payloads up to this size are decoded on the event loop (well under a millisecond); larger
# ones in a worker thread so that one big image cannot stall every other request.
INLINE_DECODE_BYTES = 64 * 1024


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    summary="Classify images with the most accurate stitch that fits the latency budget",
    responses={
        400: {"model": ErrorResponse, "description": "Malformed body, or an undecodable image."},
        401: {
            "model": ErrorResponse,
            "description": "SNNET_API_KEY is set; X-API-Key missing or wrong.",
        },
        413: {"model": ErrorResponse, "description": "Body or image over the configured limits."},
        415: {
            "model": ErrorResponse,
            "description": "Neither multipart/form-data nor application/json.",
        },
        422: {
            "model": ErrorResponse,
            "description": "Bad fields, unknown stitch, a disabled policy, or a budget no stitch meets.",
        },
        503: {
            "model": ErrorResponse,
            "description": "Not ready, or overloaded for this budget (see Retry-After).",
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ClassifyJSON.model_json_schema(),
                    "examples": {
                        "budget": {
                            "summary": "With a latency budget",
                            "value": {"images": [DIGIT_PNG_B64], "latency_budget_ms": 50},
                        },
                        "stitch": {
                            "summary": "A given stitch",
                            "value": {"image": DIGIT_PNG_B64, "stitch_id": 2, "top_k": 3},
                        },
                        "cost": {
                            "summary": "Under a GFLOPs cap",
                            "value": {"image": DIGIT_PNG_B64, "max_gflops": 0.01},
                        },
                    },
                },
                "multipart/form-data": {
                    "schema": multipart_schema(),
                    "example": {"image": ["(binary PNG)"], "latency_budget_ms": 50},
                },
            },
        }
    },
)
async def classify(request: Request) -> JSONResponse:
    arrived = request.scope.get(ARRIVED) or time.monotonic()
    engine = engine_of(request)  # not a Depends: FastAPI's dependency solving cost 0.04 ms here
    engine.metrics.arrivals.inc()
    authorise(request, engine)
    with engine.ingress.entered() as ticket:  # in the HTTP backlog until queued
        req = await parse_classify(
            request, engine.settings, engine.net.num_classes, engine.transform.work_pixels
        )
        ticket.sized(req.payload_bytes)
        plan, pending = await admit(engine, req, arrived)
        ticket.queued()
    await until_answered(request.receive, engine, plan, pending)
    result = await pending
    return _encode(engine, req, plan, result, arrived)


async def admit(
    engine: Engine, req: ClassifyRequest, arrived: float
) -> tuple[Plan, asyncio.Future]:
    """Plan a parsed request, decode its images (unless it brought a preprocessed tensor) and
    queue it for the model: the plan, and the future of its Result. Every route that classifies
    goes through here (and an API worker's requests through ``plan_request`` and ``submit``),
    so /classify, the V2 protocol and every worker share one queue, one planner and one set of
    metrics.

    Raises:
        Refusal: what the planner refused (422, or 503 when shed) or a bad image (400/413).
    """
    plan = plan_request(engine, req.options, req.n, req.payload_bytes, arrived)
    x = req.tensor if req.tensor is not None else await _decode(engine, req)
    return plan, submit(engine, plan, x)


def plan_request(
    engine: Engine, options: ClassifyOptions, n: int, payload_bytes: int, arrived: float
) -> Plan:
    """Count the arrival and plan it; raises the planner's Refusal (a 503 counted as shed, a 422
    for the log's tally of refused requests)."""
    _count_arrival(engine, n, options, arrived)
    plan = engine.planner.plan(
        options, n, time.monotonic(), arrived=arrived, payload_bytes=payload_bytes
    )
    if isinstance(plan, Refusal):
        if plan.status == 503:
            engine.metrics.count_shed(plan.detail, plan.shed)
        else:
            engine.metrics.count_refused(plan.detail)
        raise plan
    return plan


def submit(engine: Engine, plan: Plan, x: torch.Tensor) -> asyncio.Future:
    """Queue a planned request's images for the model: the future of its Result."""
    return engine.scheduler.submit(x, plan.stitch, plan.deadline, time.monotonic())


async def until_answered(
    receive: Callable[[], Awaitable[dict]], engine: Engine, plan: Plan, pending: asyncio.Future
) -> None:
    """Wait for ``pending``, the request's Result; raise a 499 if its HTTP client goes first.

    A client that closes its connection while its images wait in the queue takes them out
    unrun, as a cancelled gRPC call does (``Scheduler.submit``): a batch nobody reads would
    delay every request behind it and be counted as load. Its request is counted with status
    CLIENT_GONE, not as an answer; as a missed budget too if its deadline had passed. Only a
    request that waits is watched (one sent to the model at once cannot be withdrawn, and a
    watcher costs a task: ~10 us).

    Args:
        receive: The request's ASGI ``receive``, its body read: its next message is
            ``http.disconnect`` when the client goes (or once the answer is sent).
    """
    if pending.done() or not engine.scheduler.waiting(pending):
        return
    try:
        if not await client_went(receive, pending):
            return
    except asyncio.CancelledError:  # (the server's grace period ran out: nobody waits for it)
        pending.cancel()
        raise
    engine.scheduler.withdraw(pending)  # (unless a batch has taken it)
    pending.cancel()
    if time.monotonic() >= plan.deadline:
        engine.record_unanswered(plan)
    raise Refusal(CLIENT_GONE, GONE_DETAIL)


async def client_went(receive: Callable[[], Awaitable[dict]], fut: asyncio.Future) -> bool:
    """Wait for ``fut`` or for the HTTP client to disconnect (``receive``, the request's body
    read), whichever comes first: whether the client went first (``fut`` still pending)."""
    gone = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait((fut, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if fut.done():
        return False
    if gone.exception() is not None:  # (a server that cannot say: wait for the answer)
        await asyncio.wait((fut,))
        return False
    return True


async def _disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def probabilities(result: Result) -> np.ndarray:
    """Softmax of a result's logits, (n, classes) float32: in numpy, a third of the torch
    version's time for a few rows."""
    z = result.logits.numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Class indices of the ``k`` most probable classes per row, best first."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def authorise(request: Request, engine: Engine) -> None:
    key = engine.settings.api_key
    given = request.headers.get("x-api-key", "").encode()
    if key is not None and not hmac.compare_digest(given, key.encode()):
        raise Refusal(401, "missing or wrong X-API-Key header")


def _count_arrival(engine: Engine, n: int, options: ClassifyOptions, arrived: float) -> None:
    engine.metrics.images.inc(n)
    engine.controller.observe_arrival(n, arrived)
    if options.latency_budget_ms is not None:
        engine.metrics.request_budget_seconds.observe(options.latency_budget_ms / 1e3)


async def _decode(engine: Engine, req: ClassifyRequest) -> torch.Tensor:
    """Decode and preprocess every image: (n, C, H, W) float32."""
    if req.payload_bytes <= INLINE_DECODE_BYTES:
        return _decode_all(engine, req.images)  # small: cheaper than a hop to a thread
    return await asyncio.to_thread(_decode_all, engine, req.images)


def _decode_all(engine: Engine, images: list[tuple[str, bytes]]) -> torch.Tensor:
    """Decode every image (each checked against the limits), then preprocess them as one
    batch: (n, C, H, W) float32."""
    s = engine.settings
    try:
        decoded = [
            decode_image(
                data,
                max_bytes=s.max_image_bytes,
                max_pixels=s.max_image_pixels,
                name=name,
                work_pixels=engine.transform.work_pixels,
            )
            for name, data in images
        ]
    except ImageError as e:
        raise Refusal(e.status, e.detail) from None
    return engine.transform.batch(decoded)


def _encode(
    engine: Engine, req: ClassifyRequest, plan: Plan, result: Result, arrived: float
) -> JSONResponse:
    """The answer, rendered here: returning a Response skips FastAPI's re-validation of it
    against ``ClassifyResponse`` (which documents it), after the clock has stopped."""
    probs = probabilities(result)
    total_ms = (time.monotonic() - arrived) * 1e3
    met = engine.record_answer(plan, result, req.n, req.payload_bytes, total_ms)
    row = engine.menu.rows[plan.stitch]
    return JSONResponse(
        answer(engine.manifest.labels, row, req.options.top_k, probs, plan, result, total_ms, met)
    )


def answer(
    labels: list[str],
    row: StitchRow,
    k: int,
    probs: np.ndarray,
    plan: Plan,
    result: Result,
    total_ms: float,
    met: bool,
) -> dict:
    """The /classify answer's body (``ClassifyResponse``)."""
    top = top_k(probs, k)
    predictions = [
        [
            {"label": labels[c], "class_index": c, "score": round(float(p[c]), 6)}
            for c in cs.tolist()
        ]
        for p, cs in zip(probs, top, strict=True)
    ]
    return {
        "predictions": predictions,
        "stitch": {
            "id": row.id,
            "description": row.description,
            "gflops": row.gflops,
            "accuracy": row.accuracy,
        },
        "timing": {
            "queue_ms": round(result.queue_ms, 3),
            "compute_ms": round(result.compute_ms, 3),
            "total_ms": round(total_ms, 3),
            "predicted_ms": round(plan.predicted_ms, 3),
        },
        "latency_budget_ms": plan.budget_ms,
        "budget_met": met,
        "best_effort": plan.best_effort,
    }
