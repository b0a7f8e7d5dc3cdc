"""The Open Inference Protocol ("V2", as Triton, KServe and MLServer speak it) over REST, on the
same planner, queue and metrics as /classify.

- The model is the checkpoint (``SNNET_MODEL_NAME``, default the checkpoint directory's name);
  a version is a stitch: ``/versions/{stitch_id}`` pins one, and no version lets the planner
  choose, as /classify does.
- Inputs: ``image``, encoded images as a BYTES tensor [N] (base64 strings in JSON, raw bytes in
  the binary extension), or ``input``, images already preprocessed as FP32 [N, C, H, W] in the
  manifest's input size.
- Outputs: ``probabilities`` FP32 [N, classes] and ``labels`` BYTES [N, top_k] of
  ``"score:index:label"`` (the classification extension's format); ``outputs`` in the request
  picks which, and ``parameters.classification = k`` on an output returns it in that format.
- Request ``parameters``: ``latency_budget_ms``, ``max_gflops``, ``stitch_id``, ``top_k``;
  Triton's ``timeout`` (microseconds) is the budget when ``latency_budget_ms`` is absent.
  Response ``parameters``: the stitch that answered, its GFLOPs and accuracy, timing,
  ``budget_met`` and ``best_effort``.
- The binary tensor extension (``Inference-Header-Content-Length``, ``binary_data_size``,
  ``binary_data`` outputs), which Triton's own clients use by default.
- Errors are ``{"error": "..."}`` with /classify's statuses (the app's handlers say so for
  every path under /v2).
"""

from __future__ import annotations

import asyncio
import binascii
import difflib
import json
import math
import struct
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from ..engine import Engine
from ..errors import ComputeError, Refusal
from ..ingress import ARRIVED
from ..parsing import (
    INLINE_PARSE_BYTES,
    ClassifyRequest,
    b64decode,
    check_images,
    fit_top_k,
    read_body,
    validation_message,
)
from ..planner import Plan
from ..scheduler import Result
from ..schemas import (
    MAX_BUDGET_MS,
    V2_INFER_EXAMPLE,
    ClassifyOptions,
    V2ErrorResponse,
    V2InferResponse,
    V2Live,
    V2ModelConfig,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from .classify import admit, authorise, probabilities, top_k, until_answered
from .deps import engine_of

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ["classification", "binary_tensor_data", "parameters", "model_configuration"]
INPUTS = ("image", "input")
BYTES_LAYOUT = (
    "in binary data each BYTES element is its length as 4 bytes, little-endian, then its bytes "
    "(an encoded image sent raw lacks the length)"
)
OUTPUTS = ("probabilities", "labels")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {k: {"model": V2ErrorResponse} for k in statuses}


MODEL_ERRORS = _errors(404, 422, 503)
INFER_ERRORS = _errors(400, 401, 404, 413, 415, 422, 503)
INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["inputs"]},
                "example": V2_INFER_EXAMPLE,
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "The binary tensor extension: Inference-Header-Content-Length "
                "bytes of JSON, then the inputs' binary data.",
            },
        },
    }
}


def _is_index(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts characters ``int`` refuses (\u00b2) or
    reads as other digits (Arabic-Indic)."""
    return text.isascii() and text.isdigit()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def server_version() -> str:
    try:
        return version("snnet-serve")
    except PackageNotFoundError:
        return "unknown"


def pinned_stitch(engine: Engine, name: str, version: str | None) -> int | None:
    """The stitch a model name and version pin (None: the planner chooses), or a 404 that names
    what exists. REST and gRPC resolve them here."""
    if name != engine.model_name:
        raise Refusal(404, f"unknown model {name!r}; this server serves {engine.model_name!r}")
    if version is None or version == "":
        return None
    if not _is_index(version) or int(version) >= len(engine.menu):
        raise Refusal(
            404,
            f"unknown version {version!r} of {name!r}: a version is a stitch id, "
            f"0..{len(engine.menu) - 1}",
        )
    return int(version)


def _model(request: Request, name: str, version: str | None) -> tuple[Engine, int | None]:
    engine = engine_of(request)
    return engine, pinned_stitch(engine, name, version)


# -- health and metadata ----------------------------------------------------------------------


@router.get("/health/live", summary="Server live (V2)", response_model=V2Live)
async def live() -> dict:
    return {"live": True}


@router.get(
    "/health/ready", summary="Server ready (V2)", response_model=V2Ready, responses=_errors(503)
)
async def ready(request: Request) -> dict:
    engine_of(request)  # 503 until start-up has finished
    return {"ready": True}


@router.get("", summary="Server metadata (V2)", response_model=V2ServerMetadata)
async def server_metadata() -> dict:
    return {"name": "snnet-serve", "version": server_version(), "extensions": EXTENSIONS}


# Each route with a version in its path has its own function: one function for both routes
# made `version` a query parameter of the route without it (`/infer?version=3` pinned a stitch),
# outside the protocol, and so documented in the OpenAPI.


@router.get(
    "/models/{name}",
    summary="Model metadata (V2)",
    response_model=V2ModelMetadata,
    responses=MODEL_ERRORS,
)
async def model_metadata(request: Request, name: str) -> dict:
    return _metadata(request, name, None)


@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata of one stitch (V2)",
    response_model=V2ModelMetadata,
    responses=MODEL_ERRORS,
)
async def stitch_metadata(request: Request, name: str, version: str) -> dict:
    return _metadata(request, name, version)


def _metadata(request: Request, name: str, version: str | None) -> dict:
    engine, _ = _model(request, name, version)
    c, h, w = engine.net.input_size
    return {
        "name": engine.model_name,
        "versions": [str(r.id) for r in engine.menu.rows],
        "platform": "pytorch_snnet",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, engine.net.num_classes]},
            {"name": "labels", "datatype": "BYTES", "shape": [-1, -1]},
        ],
    }


@router.get(
    "/models/{name}/config",
    summary="Model configuration (Triton's extension)",
    response_model=V2ModelConfig,
    responses=MODEL_ERRORS,
)
async def model_config(request: Request, name: str) -> dict:
    return model_config_of(_model(request, name, None)[0])


@router.get(
    "/models/{name}/versions/{version}/config",
    summary="Model configuration of one stitch (Triton's extension)",
    response_model=V2ModelConfig,
    responses=MODEL_ERRORS,
)
async def stitch_config(request: Request, name: str, version: str) -> dict:
    return model_config_of(_model(request, name, version)[0])


def model_config_of(engine: Engine) -> dict:
    """Triton's model configuration (its JSON form; gRPC's ModelConfig parses from it): what
    tools built on Triton read before their first request. max_batch_size 0: the shapes are
    full, and a request's images lie along the first dimension."""
    c, h, w = engine.net.input_size
    classes = engine.net.num_classes
    return {
        "name": engine.model_name,
        "platform": "pytorch_snnet",
        "max_batch_size": 0,
        "input": [
            {"name": "image", "data_type": "TYPE_STRING", "dims": [-1]},
            {"name": "input", "data_type": "TYPE_FP32", "dims": [-1, c, h, w]},
        ],
        "output": [
            {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [-1, classes]},
            {"name": "labels", "data_type": "TYPE_STRING", "dims": [-1, -1]},
        ],
        "version_policy": {"specific": {"versions": [r.id for r in engine.menu.rows]}},
        "parameters": {
            "max_images_per_request": {"string_value": str(engine.settings.max_images_per_request)},
            "stitches": {"string_value": str(len(engine.menu.rows))},
            # what a request without a budget gets, and the share of budgets the server
            # promises to meet (SNNET_DEFAULT_BUDGET_MS, SNNET_SLO_TARGET)
            "default_latency_budget_ms": {"string_value": f"{engine.settings.default_budget_ms:g}"},
            "slo_target": {"string_value": f"{engine.settings.slo_target:g}"},
            "versions": {
                "string_value": "a version is a stitch; without one, the planner chooses the "
                "most accurate stitch that meets parameters.latency_budget_ms"
            },
        },
    }


@router.get(
    "/models/{name}/ready",
    summary="Model ready (V2)",
    response_model=V2ModelReady,
    responses=MODEL_ERRORS,
)
async def model_ready(request: Request, name: str) -> dict:
    _model(request, name, None)
    return {"name": name, "ready": True}


@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Stitch ready (V2)",
    response_model=V2ModelReady,
    responses=MODEL_ERRORS,
)
async def stitch_ready(request: Request, name: str, version: str) -> dict:
    _model(request, name, version)
    return {"name": name, "ready": True}


# -- inference -----------------------------------------------------------------------------------


@router.post(
    "/models/{name}/infer",
    summary="Classify (V2): the most accurate stitch that fits the budget in `parameters`",
    response_model=V2InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer(request: Request, name: str) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Classify with one stitch (V2)",
    response_model=V2InferResponse,
    responses=INFER_ERRORS,
    openapi_extra=INFER_BODY,
)
async def infer_stitch(request: Request, name: str, version: str) -> Response:
    return await _infer(request, name, version)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    arrived = request.scope.get(ARRIVED) or time.monotonic()
    engine, pinned = _model(request, name, version)
    engine.metrics.arrivals.inc()
    authorise(request, engine)
    with engine.ingress.entered() as ticket:
        doc, req, wanted = await _parse(request, engine, pinned)
        ticket.sized(req.payload_bytes)
        plan, pending = await admit_v2(engine, doc, req, arrived)
        ticket.queued()
    await until_answered(request.receive, engine, plan, pending)
    result = await result_of(engine, req, pending)
    return _answer(engine, doc, req, wanted, plan, result, arrived)


async def _parse(
    request: Request, engine: Engine, pinned: int | None
) -> tuple[dict, ClassifyRequest, dict[str, dict]]:
    """REST framing: the request document (JSON, then the binary part if the header says so),
    and what ``build_request`` makes of it."""
    body = await read_body(request, engine.settings.max_body_bytes)
    header = request.headers.get(HEADER_LENGTH)
    if len(body) <= INLINE_PARSE_BYTES:
        return _parse_body(body, header, engine, pinned)
    # (JSON and base64 of several MB held the event loop, every other request, for 60+ ms)
    return await asyncio.to_thread(_parse_body, body, header, engine, pinned)


def _parse_body(
    body: bytes, header: str | None, engine: Engine, pinned: int | None
) -> tuple[dict, ClassifyRequest, dict[str, dict]]:
    if header is not None:
        if not _is_index(header) or int(header) > len(body):
            raise Refusal(400, f"{HEADER_LENGTH} {header!r} is not a length within the body")
        raw, binary = body[: int(header)], memoryview(body)[int(header) :]
    else:
        raw, binary = body, memoryview(b"")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, 4300+ digit ints
        raise Refusal(400, f"inference request is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise Refusal(400, 'an inference request is an object with a non-empty "inputs" list')
    data, offset = [], 0
    for spec in doc["inputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise Refusal(400, f"an input is an object with a name, got {spec!r:.60}")
        if not isinstance(spec.get("parameters") or {}, dict):
            raise Refusal(400, f"input {spec['name']!r}: parameters must be an object")
        one, offset = _tensor_data(spec, binary, offset)
        data.append(one)
    if offset != len(binary):
        raise Refusal(400, f"{len(binary) - offset} bytes of binary data no input claims")
    req, wanted = build_request(engine, doc, data, pinned)
    return doc, req, wanted


def build_request(
    engine: Engine, doc: dict, data: list[Any], pinned: int | None
) -> tuple[ClassifyRequest, dict[str, dict]]:
    """The protocol's request, whatever carried it (REST or gRPC), as a ClassifyRequest and the
    outputs it wants (name -> their parameters). ``data[i]`` is input i's data: a buffer of raw
    tensor bytes, or a list (JSON values, or gRPC's typed contents)."""
    s = engine.settings
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise Refusal(400, '"parameters" must be an object')
    options = fit_top_k(_options(params, pinned), engine.net.num_classes)
    names = [spec.get("name") for spec in doc["inputs"]]
    if len(set(names)) != len(names):
        raise Refusal(400, f"inputs {names}: each input may appear once")
    images, tensor = None, None
    for spec, one in zip(doc["inputs"], data, strict=True):
        if spec.get("name") not in INPUTS:
            raise Refusal(
                400, f"unknown input {spec.get('name')!r}; inputs are {list(INPUTS)} (one of them)"
            )
        if spec["name"] == "image":
            images = _images(spec, one, s.max_images_per_request)
        else:
            tensor = _preprocessed(spec, one, engine.net.input_size, s.max_images_per_request)
    if (images is None) == (tensor is None):
        raise Refusal(400, "give exactly one input: 'image' (BYTES) or 'input' (FP32)")
    n = len(images) if images is not None else tensor.shape[0]
    if n == 0 or n > s.max_images_per_request:
        raise Refusal(422, f"{n} images; 1..{s.max_images_per_request} per request")
    wanted = _outputs(doc, params, engine.net.num_classes)
    req = ClassifyRequest(images or [], options, tensor)
    if images:
        req = check_images(req, s, engine.transform.work_pixels)
    return req, wanted


V2_PARAMS = frozenset({"latency_budget_ms", "max_gflops", "stitch_id", "top_k"})
# Ours and Triton's timeout by their bare names (lower case, no underscores), for near misses.
_BARE_PARAMS = {n.replace("_", ""): n for n in [*V2_PARAMS, "timeout"]}
# Shorthands of our parameters' names (lower case, no dashes or underscores) that mean them.
V2_PARAM_ALIASES = {
    "budget": "latency_budget_ms", "budgetms": "latency_budget_ms",
    "latencyms": "latency_budget_ms", "latency": "latency_budget_ms", "stitch": "stitch_id",
    "gflops": "max_gflops", "k": "top_k",
}  # fmt: skip


async def admit_v2(
    engine: Engine, doc: dict, req: ClassifyRequest, arrived: float
) -> tuple[Plan, asyncio.Future]:
    """``admit``, with a refusal of a budget that came from Triton's ``timeout`` saying so: the
    planner names ``latency_budget_ms``, a field this client never sent."""
    try:
        return await admit(engine, req, arrived)
    except Refusal as e:
        params = doc.get("parameters") or {}
        timeout = params.get("timeout")
        if e.least_ms is None or timeout is None or "latency_budget_ms" in params:
            raise  # not about the budget, or the client named latency_budget_ms itself
        e.detail = (
            f"{e.detail}, that is parameters.timeout >= {math.ceil(e.least_ms * 1e3)} (this "
            f"budget is parameters.timeout={timeout} microseconds)"
        )
        raise


async def result_of(engine: Engine, req: ClassifyRequest, pending: asyncio.Future) -> Result:
    """The admitted request's Result. A NaN or infinite answer (the scheduler's ComputeError)
    to a preprocessed tensor far outside what preprocessing makes (1e30: it overflows in the
    model) is the client's tensor: a 422 that says what is expected."""
    try:
        return await pending
    except ComputeError:
        x = req.tensor
        if x is None:
            raise
        pre = engine.manifest.preprocessing
        bounds = [((0 - m) / s, (1 - m) / s) for m, s in zip(pre["mean"], pre["std"], strict=True)]
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        top = float(x.abs().max())
        if top <= 10 * max(abs(lo), abs(hi)):  # in range: the model's fault, a 500
            raise
        raise Refusal(
            422,
            f"input 'input' made the model's answer NaN or infinite: its values reach {top:g}, "
            f"where images preprocessed as this model takes them (pixels in [0, 1], less mean "
            f"{list(pre['mean'])}, over std {list(pre['std'])}) lie in [{lo:.2f}, {hi:.2f}]; or "
            f"send the encoded images as the BYTES input 'image'",
        ) from None


def _options(params: dict[str, Any], pinned: int | None) -> ClassifyOptions:
    for k in params:
        # Other parameters are ignored, as the protocol lets a server do (Triton's clients send
        # their own: priority, sequence_id, binary_data_output, ...); a near miss of ours is a
        # typo whose request went with the default budget, so it is refused. Near: the same
        # name but for case, dashes or an underscore, a few letters off (latency_budget, topk),
        # or a usual shorthand; not merely alike (batch_id, top_p, max_tokens are others').
        if k in V2_PARAMS or k == "timeout":
            continue
        bare = k.lower().replace("-", "").replace("_", "")
        close = _BARE_PARAMS.get(bare) or V2_PARAM_ALIASES.get(bare)
        if close is None:
            near = difflib.get_close_matches(bare, list(_BARE_PARAMS), n=1, cutoff=0.85)
            close = _BARE_PARAMS[near[0]] if near else None
        if close:
            raise Refusal(
                422,
                f"parameters.{k} is not a parameter of this server; did you mean {close}? "
                f"(its parameters: {', '.join(sorted(V2_PARAMS))}, and Triton's timeout in "
                f"microseconds)",
            )
    raw = {k: v for k, v in params.items() if k in V2_PARAMS}
    timeout = params.get("timeout")
    if "latency_budget_ms" not in raw and timeout is not None:
        if not _is_int(timeout) or not 0 < timeout < 10**12:
            raise Refusal(
                422,
                f"parameters.timeout: microseconds, an integer from 1 to {10**12 - 1} (one of "
                f"an hour or more is a budget of an hour, the longest); got {timeout!r}",
            )
        # Triton's timeout is in microseconds; a longer one than a budget may be is no limit
        raw["latency_budget_ms"] = min(timeout / 1e3, MAX_BUDGET_MS)
    if pinned is not None:
        if raw.get("stitch_id", pinned) != pinned:
            raise Refusal(
                422, f"parameters.stitch_id={raw['stitch_id']} differs from version {pinned}"
            )
        if "max_gflops" in raw:
            raise Refusal(
                422,
                f"parameters.max_gflops with version {pinned} in the path: a version is one "
                "stitch, a cost cap lets the planner choose; give one or the other",
            )
        raw["stitch_id"] = pinned
    try:
        return ClassifyOptions.model_validate(raw, strict=True)
    except ValidationError as e:
        raise Refusal(422, "parameters." + validation_message(e)) from None


def _tensor_data(spec: dict, binary: memoryview, offset: int) -> tuple[Any, int]:
    """An input's data: its JSON ``data``, or its slice of the binary part."""
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is None:
        if "data" not in spec:
            raise Refusal(400, f"input {spec['name']!r} has neither data nor binary_data_size")
        return spec["data"], offset
    if not _is_int(size) or size < 0 or offset + size > len(binary):
        raise Refusal(400, f"input {spec['name']!r}: binary_data_size {size!r} past the body")
    return binary[offset : offset + size], offset + size


def _shape(spec: dict) -> list[int]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise Refusal(400, f"input {spec['name']!r}: shape must be a list of sizes, got {shape!r}")
    return shape


def _given_type(spec: dict) -> str:
    """What an input's datatype was, for an error ("not None" read as a value given)."""
    given = spec.get("datatype")
    return 'and its "datatype" is missing' if given is None else f"not {given!r}"


def _images(spec: dict, data: Any, limit: int) -> list[tuple[str, bytes]]:
    """The encoded images of a BYTES input: at most ``limit``, counted from its shape before
    any element is read (a body of millions of empty elements costs nothing)."""
    if spec.get("datatype") != "BYTES":
        raise Refusal(400, f"input 'image' is BYTES (encoded images), {_given_type(spec)}")
    shape = _shape(spec)
    count = math.prod(shape)
    if not 1 <= count <= limit:
        raise Refusal(422, f"input 'image' has shape {shape}: {count} images; 1..{limit} allowed")
    out: list[bytes] = []
    if isinstance(data, memoryview):  # binary: each element a 4-byte little-endian length + bytes
        at = 0
        while at < len(data) and len(out) < count:
            if at + 4 > len(data):
                raise Refusal(400, f"input 'image': truncated BYTES element; {BYTES_LAYOUT}")
            (n,) = struct.unpack_from("<I", data, at)
            if at + 4 + n > len(data):
                raise Refusal(
                    400,
                    f"input 'image': a BYTES element of {n} bytes runs past its data "
                    f"({len(data) - at - 4} left); {BYTES_LAYOUT}",
                )
            out.append(bytes(data[at + 4 : at + 4 + n]))
            at += 4 + n
        if at != len(data):
            raise Refusal(400, f"input 'image': more BYTES data than its shape {shape} holds")
    else:  # JSON: base64 strings (gRPC: the bytes), possibly nested as the shape is
        for i, item in enumerate(_flat(data, count + 1)):
            if isinstance(item, bytes):
                out.append(item)
                continue
            if not isinstance(item, str):
                raise Refusal(400, f"input 'image'[{i}]: a base64 string in JSON, got {item!r:.40}")
            try:
                out.append(b64decode(item))
            except (binascii.Error, ValueError):
                raise Refusal(400, f"input 'image'[{i}] is not valid base64") from None
    if len(out) != count:
        got = f"only {len(out)}" if len(out) < count else f"more than {count}"
        raise Refusal(400, f"input 'image': shape {shape} but {got} elements")
    return [(f"image[{i}]", b) for i, b in enumerate(out)]


def _flat(data: Any, most: int) -> list[Any]:
    """The leaves of nested lists, in order, stopping after ``most``."""
    out: list[Any] = []
    stack = [iter(data if isinstance(data, list) else [data])]
    while stack and len(out) < most:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 8:
                raise Refusal(400, "tensor data nested deeper than its shape")
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _preprocessed(spec: dict, data: Any, size: tuple[int, int, int], limit: int) -> torch.Tensor:
    if spec.get("datatype") != "FP32":
        raise Refusal(400, f"input 'input' is FP32, {_given_type(spec)}")
    shape = _shape(spec)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(size):
        raise Refusal(422, f"input 'input' must be [N, {', '.join(map(str, size))}], got {shape}")
    if not 1 <= shape[0] <= limit:
        raise Refusal(422, f"input 'input' has {shape[0]} images; 1..{limit} allowed")
    try:
        if isinstance(data, memoryview):
            x = np.frombuffer(data, dtype="<f4")
        elif isinstance(data, np.ndarray):  # gRPC's typed contents
            x = data
        else:
            x = np.asarray(_flat(data, math.prod(shape) + 1), dtype=np.float32)
        x = x.reshape(shape)
    except (ValueError, TypeError, OverflowError) as e:
        raise Refusal(400, f"input 'input': data does not fit FP32 shape {shape} ({e})") from None
    if not np.isfinite(x).all():
        raise Refusal(422, "input 'input' has NaN or infinite values")
    return torch.from_numpy(np.array(x, dtype=np.float32))


def _outputs(doc: dict, params: dict, classes: int) -> dict[str, dict]:
    """Requested outputs and their parameters (every output when none is named)."""
    binary_all = params.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise Refusal(
            400, f"parameters.binary_data_output must be true or false, got {binary_all!r}"
        )
    requested = doc.get("outputs")
    if not requested:  # absent or empty: every output, as Triton does
        return {name: {"binary_data": binary_all} for name in OUTPUTS}
    if not isinstance(requested, list):
        raise Refusal(400, '"outputs" must be a list')
    wanted: dict[str, dict] = {}
    for spec in requested:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in OUTPUTS:
            raise Refusal(400, f"unknown output {name!r}; outputs are {list(OUTPUTS)}")
        if name in wanted:
            raise Refusal(400, f"output {name!r} requested twice")
        p = spec.get("parameters") or {}
        if not isinstance(p, dict):
            raise Refusal(400, f"output {name!r}: parameters must be an object")
        p = {"binary_data": binary_all, **p}
        if not isinstance(p["binary_data"], bool):
            raise Refusal(400, f"output {name!r}: binary_data must be true or false")
        k = p.get("classification")
        if k is not None and (not _is_int(k) or not 0 <= k <= classes):
            raise Refusal(400, f"output {name!r}: classification={k!r}; allowed 0..{classes}")
        wanted[name] = p
    return wanted


# -- the answer -----------------------------------------------------------------------------------


def answer_tensors(
    engine: Engine, req: ClassifyRequest, wanted: dict[str, dict], plan: Plan, result: Result,
    arrived: float,
) -> tuple[list[tuple[dict, Any]], dict[str, Any]]:  # fmt: skip
    """The outputs as (tensor metadata, values: FP32 array or a list of bytes) and the response
    parameters, whatever carries them; records the answer (metrics, margin, HTTP cost)."""
    probs = probabilities(result)
    labels = engine.manifest.labels
    tensors = []
    for name, p in wanted.items():
        k = p.get("classification")
        if name == "labels" or k:
            k = int(k or req.options.top_k)
            top = top_k(probs, k)
            values: Any = [
                f"{probs[i, c]:.6f}:{c}:{labels[c]}".encode()
                for i in range(len(probs))
                for c in top[i].tolist()
            ]
            tensors.append(({"name": name, "datatype": "BYTES", "shape": [len(probs), k]}, values))
        else:
            meta = {"name": name, "datatype": "FP32", "shape": list(probs.shape)}
            tensors.append((meta, probs.astype("<f4")))
    total_ms = (time.monotonic() - arrived) * 1e3
    met = engine.record_answer(plan, result, req.n, req.payload_bytes, total_ms)
    row = engine.menu.rows[plan.stitch]
    params = {
        "stitch_id": row.id, "stitch": row.description, "gflops": row.gflops,
        "accuracy": row.accuracy, "queue_ms": round(result.queue_ms, 3),
        "compute_ms": round(result.compute_ms, 3), "total_ms": round(total_ms, 3),
        "predicted_ms": round(plan.predicted_ms, 3), "latency_budget_ms": plan.budget_ms,
        "budget_met": met, "best_effort": plan.best_effort,
    }  # fmt: skip
    return tensors, params


def raw_bytes(meta: dict, values: Any) -> bytes:
    """A tensor's binary form: FP32 little-endian, BYTES as 4-byte length + bytes each."""
    if meta["datatype"] == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return values.tobytes()


def _answer(
    engine: Engine, doc: dict, req: ClassifyRequest, wanted: dict[str, dict], plan: Plan,
    result: Result, arrived: float,
) -> Response:  # fmt: skip
    tensors, params = answer_tensors(engine, req, wanted, plan, result, arrived)
    outputs, blobs = [], []
    for meta, values in tensors:
        out = dict(meta)
        if wanted[meta["name"]].get("binary_data"):
            blob = raw_bytes(meta, values)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif meta["datatype"] == "BYTES":
            out["data"] = [v.decode() for v in values]
        else:
            out["data"] = values.reshape(-1).tolist()
        outputs.append(out)
    head: dict[str, Any] = {
        "model_name": engine.model_name,
        "model_version": str(plan.stitch),
        "parameters": params,
        "outputs": outputs,
    }
    if "id" in doc:
        head["id"] = str(doc["id"])  # a string in the protocol, whatever the request sent
    if not blobs:
        return JSONResponse(head)
    text = json.dumps(head).encode()
    return Response(
        text + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )
