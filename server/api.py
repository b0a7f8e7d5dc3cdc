"""HTTP routes. Thin: parse and validate, then hand over to the service and its scheduler."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import time
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .imaging import ImageError, decode_image
from .scheduler import ChoiceError, ComputeError
from .schemas import (
    ClassifyJSON,
    ClassifyOptions,
    ClassifyResponse,
    ControllerState,
    ErrorResponse,
    HealthResponse,
    ReadyResponse,
    StitchesResponse,
    StitchInfo,
)
from .service import ModelService

# Payloads up to this size are decoded on the event loop (well under a millisecond); larger
# ones in a worker thread so that one big image cannot stall every other request.
INLINE_DECODE_BYTES = 64 * 1024


class APIError(Exception):
    """An error answer: JSON ``{"detail": ...}`` with ``status`` and optional headers."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


def get_service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]
router = APIRouter()

ERRORS = {
    400: {"model": ErrorResponse, "description": "Undecodable or unsupported image."},
    413: {"model": ErrorResponse, "description": "Body or image over the configured limits."},
    415: {
        "model": ErrorResponse,
        "description": "Content type other than multipart/form-data or application/json.",
    },
    422: {
        "model": ErrorResponse,
        "description": "Bad field values, unknown stitch, or a budget no stitch can meet.",
    },
    503: {
        "model": ErrorResponse,
        "description": "Not ready, or overloaded for this budget (see Retry-After).",
    },
}
CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "latency_budget_ms": {"type": "number", "exclusiveMinimum": 0},
                        "stitch_id": {"type": "integer"},
                        "max_gflops": {"type": "number", "exclusiveMinimum": 0},
                        "top_k": {"type": "integer", "minimum": 1, "default": 5},
                    },
                },
                "example": {"image": "(binary PNG)", "latency_budget_ms": 50},
            },
            "application/json": {
                "schema": ClassifyJSON.model_json_schema(),
                "examples": {
                    "budget": {
                        "summary": "With a latency budget",
                        "value": {"images": ["iVBORw0KGgo..."], "latency_budget_ms": 50},
                    },
                    "stitch": {
                        "summary": "A given stitch",
                        "value": {"image": "iVBORw0KGgo...", "stitch_id": 2, "top_k": 3},
                    },
                    "cost": {
                        "summary": "Under a GFLOPs cap",
                        "value": {"image": "iVBORw0KGgo...", "max_gflops": 0.005},
                    },
                },
            },
        },
    }
}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _options(raw: dict[str, Any]) -> ClassifyOptions:
    try:
        return ClassifyOptions(**raw)
    except ValidationError as e:
        raise APIError(422, _validation_message(e)) from None


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        got = (
            f" (got {err['input']!r})"
            if "input" in err and not isinstance(err["input"], dict)
            else ""
        )
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


async def _parse_multipart(
    request: Request, body: bytes, max_images: int
) -> tuple[list[tuple[str, bytes]], ClassifyOptions]:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, stream(), max_files=max_images + 1, max_fields=16
        ).parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise APIError(422, f"too many images; at most {max_images} per request") from None
        raise APIError(400, f"malformed multipart body: {e.message}") from None
    images = []
    for i, part in enumerate(form.getlist("image")):
        if not isinstance(part, UploadFile):
            raise APIError(422, "form field 'image' must be a file part, not text")
        images.append((part.filename or f"image[{i}]", await part.read()))
    known = {"image", *ClassifyOptions.model_fields}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise APIError(422, f"unknown form fields {unknown}; allowed: {sorted(known)}")
    raw = {k: form.get(k) for k in ClassifyOptions.model_fields if form.get(k) not in (None, "")}
    return images, _options(raw)


def _parse_json(body: bytes) -> tuple[list[tuple[str, bytes]], ClassifyOptions]:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise APIError(
            422,
            'JSON body must be an object like {"images": ["<base64>"], "latency_budget_ms": 50}',
        )
    try:
        req = ClassifyJSON(**raw)
    except ValidationError as e:
        raise APIError(422, _validation_message(e)) from None
    if req.images is not None and req.image is not None:
        raise APIError(422, "give either 'images' (a list) or 'image' (one), not both")
    encoded = (
        req.images if req.images is not None else ([req.image] if req.image is not None else [])
    )
    images = []
    for i, text in enumerate(encoded):
        if "," in text[:100] and text.startswith("data:"):
            text = text.split(",", 1)[1]  # data URL
        try:
            images.append((f"images[{i}]", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise APIError(400, f"images[{i}] is not valid base64") from None
    return images, ClassifyOptions(**req.model_dump(exclude={"images", "image"}))


def _decode_all(service: ModelService, images: list[tuple[str, bytes]]) -> torch.Tensor:
    s = service.settings
    tensors = []
    for name, data in images:
        img = decode_image(
            data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, name=name
        )
        tensors.append(service.transform(img))
    return torch.stack(tensors)


def _choose(
    service: ModelService, opts: ClassifyOptions, n: int
) -> tuple[int, float | None, float | None, float | None]:
    """The stitch to run, the budget that applies (None: no budget), and for a queue-aware
    choice (None for others) its predicted time without the controller's margin and the part of
    that spent outside the model queue (compute and the HTTP layer's backlog)."""
    stitches = service.manifest.stitches
    if opts.stitch_id is not None and opts.max_gflops is not None:
        raise APIError(422, "give at most one of stitch_id and max_gflops")
    if opts.stitch_id is not None:
        if not 0 <= opts.stitch_id < len(stitches):
            raise APIError(
                422,
                f"unknown stitch_id {opts.stitch_id}; valid ids are 0..{len(stitches) - 1} (GET /stitches)",
            )
        return opts.stitch_id, opts.latency_budget_ms, None, None
    candidates = None
    if opts.max_gflops is not None:
        candidates = [r["id"] for r in stitches if r["gflops"] <= opts.max_gflops]
        if not candidates:
            cheapest = min(r["gflops"] for r in stitches)
            raise APIError(
                422,
                f"max_gflops={opts.max_gflops:g} is below the cheapest stitch ({cheapest:.6g} GFLOPs); allowed: max_gflops >= {cheapest:.6g}",
            )
        if opts.latency_budget_ms is None:
            return next(s for s in service.ranking if s in set(candidates)), None, None, None
    budget = (
        opts.latency_budget_ms
        if opts.latency_budget_ms is not None
        else service.settings.default_budget_ms
    )
    policy = opts.policy or service.settings.policy
    sched = service.scheduler
    if policy == "most_accurate":
        pool = candidates if candidates is not None else service.ranking
        return next(s for s in service.ranking if s in set(pool)), budget, None, None
    if policy == "cheapest":
        pool = candidates if candidates is not None else service.ranking
        return min(pool, key=lambda s: sched.idle_ms(s, n)), budget, None, None
    network = service.settings.network_ms
    if policy == "static":
        choice = sched.choose(budget, n, candidates, static=True, network_ms=network)
        return choice.stitch, budget, None, None
    # adaptive: the controller's load level narrows the menu; its margin pads the prediction.
    control = service.controller
    allowed = set(control.allowed_now(time.monotonic()))
    pool = [s for s in (candidates if candidates is not None else service.ranking) if s in allowed]
    if not pool:  # a cost cap (max_gflops) below everything the load level allows
        pool = candidates
    margin, ingress = control.margin_ms, service.ingress_wait_ms()
    choice = sched.choose(budget, n, pool, ingress + margin, protect_ms=margin, network_ms=network)
    unqueued = choice.predicted_ms - choice.predicted_wait_ms + ingress
    return choice.stitch, budget, choice.predicted_ms - margin, unqueued


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=ERRORS,
    openapi_extra=CLASSIFY_BODY,
    summary="Classify images with the most accurate stitch that fits the latency budget",
)
async def classify(request: Request, service: Service) -> Any:
    service.metrics.arrivals.inc()
    service.in_flight += 1
    request.state.parsing = True
    try:
        return await _classify(request, service)
    finally:
        _parsed(request, service)


def _parsed(request: Request, service: ModelService) -> None:
    """The request leaves the HTTP layer's backlog (queued for the model, or answered)."""
    if request.state.parsing:
        request.state.parsing = False
        service.in_flight -= 1


async def _classify(request: Request, service: Service) -> Any:
    arrived = time.monotonic()
    s = service.settings
    if s.api_key is not None and not hmac.compare_digest(
        request.headers.get("x-api-key", "").encode(), s.api_key.encode()
    ):
        raise APIError(401, "missing or wrong X-API-Key header")
    if not service.ready:
        raise APIError(503, f"model not ready: {service.detail}", {"Retry-After": "5"})
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise APIError(
            415,
            f"content type {ctype or '(none)'!r} not supported; send multipart/form-data (image parts) or application/json (base64 images)",
        )
    body = await _read_body(request, s.max_body_bytes)
    if ctype == "application/json":
        images, opts = _parse_json(body)
    else:
        images, opts = await _parse_multipart(request, body, s.max_images_per_request)
    if not images:
        raise APIError(
            422, "no image given: send one or more 'image' file parts, or JSON 'images'/'image'"
        )
    if len(images) > s.max_images_per_request:
        raise APIError(422, f"{len(images)} images; at most {s.max_images_per_request} per request")
    num_classes = service.net.num_classes
    if opts.top_k > num_classes:
        raise APIError(
            422,
            f"top_k={opts.top_k} but the model has {num_classes} classes; allowed: 1..{num_classes}",
        )
    service.metrics.images.inc(len(images))
    if service.controller is not None:
        service.controller.observe_arrival(len(images), arrived)
    if opts.latency_budget_ms is not None:
        service.metrics.request_budget_seconds.observe(opts.latency_budget_ms / 1e3)
    try:
        # Choose first: a request that will be refused is refused before any image is decoded.
        stitch, budget, predicted_ms, unqueued_ms = _choose(service, opts, len(images))
        try:
            if sum(len(b) for _, b in images) <= INLINE_DECODE_BYTES:
                x = _decode_all(service, images)  # small: cheaper than a hop to a thread
            else:
                x = await asyncio.to_thread(_decode_all, service, images)
        except ImageError as e:
            raise APIError(e.status, e.detail) from None
        # The budget counts from arrival: parsing and decoding already spent part of it, and
        # SNNET_NETWORK_MS of it belongs to the way there and back.
        remaining = (
            None if budget is None else budget - s.network_ms - (time.monotonic() - arrived) * 1e3
        )
        pending = service.scheduler.submit(x, stitch, remaining)
        _parsed(request, service)
        result = await pending
    except ChoiceError as e:
        headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
        raise APIError(e.status, e.detail, headers) from None
    except ComputeError as e:
        raise APIError(500, str(e)) from None

    probs = torch.softmax(result.logits, dim=-1)
    top = probs.topk(opts.top_k, dim=-1)
    labels = service.manifest.labels
    predictions = [
        [
            {"label": labels[c], "class_index": int(c), "score": round(float(p), 6)}
            for p, c in zip(ps, cs, strict=True)
        ]
        for ps, cs in zip(top.values.tolist(), top.indices.tolist(), strict=True)
    ]
    total_ms = (time.monotonic() - arrived) * 1e3
    service.observe_http(total_ms, result.queue_ms, result.compute_ms)
    if unqueued_ms is not None:
        # The margin covers what the scheduler cannot plan: its own HTTP work and compute or
        # backlog running over the prediction. Not the queue wait: under earliest-deadline-first
        # a request may wait longer than predicted by design, for one due sooner, within its
        # deadline (admission checks that).
        service.controller.observe_residual(total_ms - result.queue_ms - unqueued_ms)
    met = budget is None or total_ms + s.network_ms <= budget
    m = service.metrics
    m.stitch_chosen.labels(str(stitch)).inc()
    row = service.manifest.stitches[stitch]
    m.gflops_served.inc(row["gflops"] * len(images))
    if budget is not None:
        (m.budget_met if met else m.budget_missed).inc()
    return {
        "predictions": predictions,
        "stitch": {
            "id": stitch,
            "description": row["description"],
            "gflops": row["gflops"],
            "accuracy": row.get("accuracy"),
        },
        "timing": {
            "queue_ms": round(result.queue_ms, 3),
            "compute_ms": round(result.compute_ms, 3),
            "total_ms": round(total_ms, 3),
            "predicted_ms": None if predicted_ms is None else round(predicted_ms, 3),
        },
        "latency_budget_ms": budget,
        "budget_met": met,
    }


def _stitch_info(service: ModelService, row: dict) -> dict:
    sid = row["id"]
    measured = service.profile.latency_ms.get(sid, {})
    return StitchInfo(
        id=sid,
        description=row["description"],
        anchors=row["anchors"],
        gflops=row["gflops"],
        params_m=row["params_m"],
        accuracy=row.get("accuracy"),
        latency_ms={str(b): ms for b, ms in sorted(measured.items())},
        predicted_ms={
            str(b): round(service.latency.predict_ms(sid, b), 4) for b in sorted(measured)
        },
        pareto=sid in service.pareto,
    ).model_dump()


def _require_ready(service: ModelService) -> None:
    if not service.ready:
        raise APIError(503, f"model not ready: {service.detail}", {"Retry-After": "5"})


@router.get(
    "/stitches",
    response_model=StitchesResponse,
    responses={503: ERRORS[503]},
    summary="The stitch menu on this device",
)
async def list_stitches(
    service: Service,
    pareto: Annotated[bool, Query(description="Only the accuracy/GFLOPs Pareto front.")] = False,
) -> Any:
    _require_ready(service)
    rows = [r for r in service.manifest.stitches if not pareto or r["id"] in service.pareto]
    return {
        "device": str(service.device),
        "dtype": service.settings.dtype,
        "stitches": [_stitch_info(service, r) for r in rows],
    }


@router.get(
    "/stitches/{stitch_id}",
    response_model=StitchInfo,
    responses={404: {"model": ErrorResponse}, 503: ERRORS[503]},
    summary="One stitch",
)
async def get_stitch(stitch_id: int, service: Service) -> Any:
    _require_ready(service)
    rows = service.manifest.stitches
    if not 0 <= stitch_id < len(rows):
        raise APIError(404, f"no stitch {stitch_id}; valid ids are 0..{len(rows) - 1}")
    return _stitch_info(service, rows[stitch_id])


@router.get(
    "/controller",
    response_model=ControllerState,
    responses={503: ERRORS[503]},
    summary="The controller's state: load level, arrival rate, corrections, fleet figures",
)
async def controller(service: Service) -> Any:
    _require_ready(service)
    return {"policy": service.settings.policy, **service.controller.state()}


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
async def readyz(service: Service) -> JSONResponse:
    body = {"ready": service.ready, "detail": service.detail}
    return JSONResponse(body, status_code=200 if service.ready else 503)


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
async def metrics(service: Service) -> Response:
    if service.scheduler is not None:
        service.metrics.queue_predicted_wait.set(service.scheduler.predicted_wait_ms() / 1e3)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
