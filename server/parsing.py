"""Request bodies to one typed request: images (still encoded) and ClassifyOptions.

Multipart (``image`` file parts + option fields) and JSON (base64 ``images``/``image`` + the
same options) produce the same ``ClassifyRequest``; nothing is decoded here, so a request the
planner refuses costs no image decoding.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from .config import Settings
from .errors import Refusal
from .schemas import ClassifyJSON, ClassifyOptions


@dataclass(frozen=True)
class ClassifyRequest:
    images: list[tuple[str, bytes]]  # (name for error messages, encoded bytes)
    options: ClassifyOptions

    @property
    def payload_bytes(self) -> int:
        return sum(len(b) for _, b in self.images)


async def parse_classify(request: Request, settings: Settings, num_classes: int) -> ClassifyRequest:
    """Read, parse and check a /classify body against the limits and the model.

    Raises:
        Refusal: 400 malformed, 413 too large, 415 content type, 422 bad or missing fields.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise Refusal(
            415,
            f"content type {ctype or '(none)'!r} not supported; send multipart/form-data (image "
            "parts) or application/json (base64 images)",
        )
    body = await _read_body(request, settings.max_body_bytes)
    limit = settings.max_images_per_request
    if ctype == "application/json":
        req = _parse_json(body)
    else:
        req = await _parse_multipart(request, body, limit)
    if not req.images:
        raise Refusal(
            422, "no image given: send one or more 'image' file parts, or JSON 'images'/'image'"
        )
    if len(req.images) > limit:
        raise Refusal(422, f"{len(req.images)} images; at most {limit} per request")
    if req.options.top_k > num_classes:
        raise Refusal(
            422,
            f"top_k={req.options.top_k} but the model has {num_classes} classes; allowed: "
            f"1..{num_classes}",
        )
    return req


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _options(model: type[ClassifyOptions], raw: dict[str, Any], *, strict: bool) -> Any:
    """Validate ``raw`` as ``model``: strict for JSON (``false`` is not a stitch id), lax for
    form fields, which are all text."""
    try:
        return model.model_validate(raw, strict=strict)
    except ValidationError as e:
        raise Refusal(422, validation_message(e)) from None


def validation_message(e: ValidationError) -> str:
    """Pydantic's errors as one line: ``field: message (got value)``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        got = ""
        if "input" in err and not isinstance(err["input"], dict):
            got = f" (got {err['input']!r:.80})"
        parts.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(parts)


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> ClassifyRequest:
    async def stream():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, stream(), max_files=max_images + 1, max_fields=16
        ).parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise Refusal(422, f"too many images; at most {max_images} per request") from None
        raise Refusal(400, f"malformed multipart body: {e.message}") from None
    images = []
    for i, part in enumerate(form.getlist("image")):
        if not isinstance(part, UploadFile):
            raise Refusal(422, "form field 'image' must be a file part, not text")
        images.append((part.filename or f"image[{i}]", await part.read()))
    known = {"image", *ClassifyOptions.model_fields}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise Refusal(422, f"unknown form fields {unknown}; allowed: {sorted(known)}")
    raw = {k: form.get(k) for k in ClassifyOptions.model_fields if form.get(k) not in (None, "")}
    return ClassifyRequest(images, _options(ClassifyOptions, raw, strict=False))


def _parse_json(body: bytes) -> ClassifyRequest:
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise Refusal(400, f"body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise Refusal(
            422,
            'JSON body must be an object like {"images": ["<base64>"], "latency_budget_ms": 50}',
        )
    req: ClassifyJSON = _options(ClassifyJSON, raw, strict=True)
    if req.images is not None and req.image is not None:
        raise Refusal(422, "give either 'images' (a list) or 'image' (one), not both")
    encoded = req.images if req.images is not None else [req.image] if req.image is not None else []
    images = []
    for i, text in enumerate(encoded):
        if text.startswith("data:") and "," in text[:100]:
            text = text.split(",", 1)[1]  # data URL
        try:
            images.append((f"images[{i}]", base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise Refusal(400, f"images[{i}] is not valid base64") from None
    options = ClassifyOptions(**req.model_dump(exclude={"images", "image"}, exclude_unset=True))
    return ClassifyRequest(images, options)
