"""Request bodies to one typed request: images (still encoded) and ClassifyOptions.

Multipart (``image`` file parts + option fields) and JSON (base64 ``images``/``image`` + the
same options) produce the same ``ClassifyRequest``; nothing is decoded here, so a request the
planner refuses costs no image decoding. Each image's header is read (``check_images``): what
its decoding would refuse without decoding a pixel is refused here, before planning.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import torch
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from .config import Settings
from .errors import Refusal
from .imaging import ImageError, checked_size
from .schemas import ClassifyJSON, ClassifyOptions


@dataclass(frozen=True)
class ClassifyRequest:
    images: list[tuple[str, bytes]]  # (name for error messages, encoded bytes)
    options: ClassifyOptions
    tensor: torch.Tensor | None = None  # or images already preprocessed: (n, C, H, W) float32
    cost_bytes: int | None = None  # payload_bytes, once ``check_images`` read the headers

    @property
    def n(self) -> int:
        return len(self.images) if self.tensor is None else int(self.tensor.shape[0])

    @cached_property
    def payload_bytes(self) -> int:
        """The payload's size as the HTTP cost line counts it (``server.imaging.checked_size``;
        the images' bytes until ``check_images`` read their headers)."""
        if self.tensor is not None:
            return self.tensor.numel() * self.tensor.element_size()
        if self.cost_bytes is not None:
            return self.cost_bytes
        return sum(len(b) for _, b in self.images)


def check_images(
    req: ClassifyRequest, settings: Settings, work_pixels: Callable[[int, int], int] | None
) -> ClassifyRequest:
    """The request with its payload's cost size, its images' headers read against the limits
    (``server.imaging.open_image``): one over a limit or not an image is refused now, as its
    decoding would refuse it, and not planned (a 20000x20000 PNG of 388 KB got a 422 naming a
    least budget of 71 ms, and a retry with it a 413; under load, a 503 to retry later).

    Raises:
        Refusal: 413 over the byte or pixel limit, 400 not an image of the allowed formats.
    """
    try:
        size = sum(
            checked_size(
                data,
                max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels,
                name=name,
                work_pixels=work_pixels,
            )
            for name, data in req.images
        )
    except ImageError as e:
        raise Refusal(e.status, e.detail) from None
    return replace(req, cost_bytes=size)


async def parse_classify(
    request: Request,
    settings: Settings,
    num_classes: int,
    work_pixels: Callable[[int, int], int] | None = None,
) -> ClassifyRequest:
    """Read, parse and check a /classify body against the limits and the model (its images'
    headers too: ``check_images``, with the transform's ``work_pixels``).

    Raises:
        Refusal: 400 malformed or not an image, 413 too large, 415 content type, 422 bad or
            missing fields.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("multipart/form-data", "application/json"):
        raise Refusal(
            415,
            f"content type {ctype or '(none)'!r} not supported; send multipart/form-data (image "
            "parts) or application/json (base64 images)",
        )
    if query := request.scope.get("query_string"):  # (read as given, it was silently ignored)
        fields = sorted({"image", *ClassifyOptions.model_fields})
        raise Refusal(
            422,
            f"POST /classify reads its fields from the body, not the query string (got "
            f"{query.decode('latin-1')!r:.80}); send them as form fields or JSON members: "
            f"{fields}",
        )
    body = await read_body(request, settings.max_body_bytes)
    limit = settings.max_images_per_request
    if ctype == "application/json":
        # A large body (a photo is ~140 KB of base64) is parsed and decoded from base64 in a
        # worker thread: 13 MB of JSON held the event loop, and every other request, for 60 ms.
        big = len(body) > INLINE_PARSE_BYTES
        req = await asyncio.to_thread(_parse_json, body) if big else _parse_json(body)
    else:
        req = await _parse_multipart(request, body, limit)
    if not req.images:
        raise Refusal(
            422, "no image given: send one or more 'image' file parts, or JSON 'images'/'image'"
        )
    if len(req.images) > limit:
        raise Refusal(422, f"{len(req.images)} images; at most {limit} per request")
    options = fit_top_k(req.options, num_classes)
    return check_images(replace(req, options=options), settings, work_pixels)


def fit_top_k(options: ClassifyOptions, num_classes: int) -> ClassifyOptions:
    """The options with the default top_k (5) cut to the class count: a model of 3 classes
    refused every request that gave none. A top_k asked for over it is a 422.

    Raises:
        Refusal: 422, a top_k given over the class count.
    """
    if options.top_k <= num_classes:
        return options
    if "top_k" not in options.model_fields_set:
        return options.model_copy(update={"top_k": num_classes})
    raise Refusal(
        422,
        f"top_k={options.top_k} but the model has {num_classes} classes; allowed: 1..{num_classes}",
    )


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, f"request body is {declared} bytes; the limit is {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding")
    if encoding is None or encoding.strip().lower() in ("", "identity"):
        return body
    inflater = _inflater(encoding)
    # What inflates to little is inflated here; the rest in a worker thread (20 KB of gzip can
    # inflate to 20 MB: 60 ms that would hold every other request).
    out = _inflate_step(inflater, body, INLINE_PARSE_BYTES)
    if inflater.eof and not inflater.unused_data and len(out) <= limit:
        return out
    return await asyncio.to_thread(_inflate_rest, inflater, out, encoding, limit)


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A body sent with ``Content-Encoding: gzip`` or ``deflate`` (Triton's clients offer both),
    decompressed to at most ``limit`` bytes (a small body can inflate to gigabytes); several
    gzip members (pigz, files joined) are one body, as gzip reads them.

    Raises:
        Refusal: 415 for another encoding, 400 for data that is not what it says, 413 over the
            limit once decompressed.
    """
    inflater = _inflater(encoding)
    return _inflate_rest(inflater, _inflate_step(inflater, body, limit + 1), encoding, limit)


def _inflater(encoding: str):
    if encoding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        raise Refusal(
            415,
            f"Content-Encoding {encoding!r} not supported; send the body uncompressed, or as gzip "
            "or deflate",
        )
    return zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or a zlib header, either


def _inflate_step(inflater, data: bytes, most: int) -> bytes:
    try:
        return inflater.decompress(data, most)
    except zlib.error as e:
        raise Refusal(400, f"the request body is not valid compressed data: {e}") from None


def _inflate_rest(inflater, out: bytes, encoding: str, limit: int) -> bytes:
    """Go on from ``out`` to the end of the body, member after member."""
    parts, size = [out], len(out)
    while True:
        if size > limit:
            raise Refusal(413, f"the request body decompresses to over the limit of {limit} bytes")
        if inflater.unconsumed_tail:  # stopped at ``most``: more of this member
            more = _inflate_step(inflater, inflater.unconsumed_tail, limit + 1 - size)
        elif not inflater.eof:
            raise Refusal(400, f"the request body's {encoding.strip()} data ends early")
        elif inflater.unused_data:  # another member follows
            rest = inflater.unused_data
            inflater = _inflater(encoding)
            more = _inflate_step(inflater, rest, limit + 1 - size)
        else:
            return b"".join(parts)
        parts.append(more)
        size += len(more)


INLINE_PARSE_BYTES = 256 * 1024  # larger JSON bodies are parsed (and inflated) in a worker thread


def b64decode(text: str) -> bytes:
    """Strict base64, but for line breaks and spaces (MIME's base64 and `base64` without -w0
    break lines every 76 characters).

    Raises:
        binascii.Error: not base64.
    """
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        return base64.b64decode("".join(text.split()), validate=True)


def _options(model: type[ClassifyOptions], raw: dict[str, Any], *, strict: bool) -> Any:
    """Validate ``raw`` as ``model``: strict for JSON (``false`` is not a stitch id), lax for
    form fields, which are all text."""
    try:
        return model.model_validate(raw, strict=strict)
    except ValidationError as e:
        raise Refusal(422, validation_message(e, sorted(model.model_fields))) from None


_FROM_STRING = {  # a JSON string where another type is meant: what to send instead
    "float_type": "a JSON number",
    "int_type": "a JSON number",
    "bool_type": "true or false",
}


def validation_message(e: ValidationError, fields: list[str] | None = None) -> str:
    """Pydantic's errors as one line: ``field: message (got value)``. With ``fields`` (a JSON
    body's members), an unknown one with the fields allowed, and a number sent as a JSON string
    named as such ("50" where 50 is meant: the form takes it, JSON does not)."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        got = ""
        if "input" in err and not isinstance(err["input"], dict):
            got = f" (got {err['input']!r:.80})"
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and fields:
            msg = f"not a field; allowed: {fields}"
        elif fields and err["type"] in _FROM_STRING and isinstance(err.get("input"), str):
            msg += f": send {_FROM_STRING[err['type']]}, not a string"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts)


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> ClassifyRequest:
    fields, files = _split_multipart(request.headers.get("content-type", ""), body, max_images)
    images = []
    for name, filename, data in files:
        if name == "image":
            images.append((_shown(filename) or f"image[{len(images)}]", data))
        else:
            fields.append((name, data.decode("utf-8", "replace")))
    if any(name == "image" for name, _ in fields):
        raise Refusal(422, "form field 'image' must be a file part, not text")
    known = {"image", *ClassifyOptions.model_fields}
    unknown = sorted({_shown(name) for name, _ in fields} - known)
    if unknown:
        raise Refusal(422, f"unknown form fields {unknown}; allowed: {sorted(known)}")
    names = [name for name, _ in fields]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        # (the last one was taken: a budget of 50 ms and then 5000 served as 5000)
        raise Refusal(422, f"form fields {twice} given more than once; give each field once")
    raw = {name: value for name, value in fields if value != ""}
    return ClassifyRequest(images, _options(ClassifyOptions, raw, strict=False))


MAX_FORM_FIELDS = 16
MAX_NAME_CHARS = 80  # of a client's file or field name, as an error message shows it


def _shown(name: str | None) -> str | None:
    """A client's name for a part, as messages show it: cut to MAX_NAME_CHARS (a 20 KB filename
    made a 20 KB error message)."""
    if name is None or len(name) <= MAX_NAME_CHARS:
        return name
    return f"{name[: MAX_NAME_CHARS - 3]}..."


def _split_multipart(
    content_type: str, body: bytes, max_images: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str, bytes]]]:
    """A multipart/form-data body (RFC 7578), already in memory, to its text fields
    ``(name, value)`` and file parts ``(name, filename, bytes)``.

    The body is whole (read under the byte limit), so the parts are slices of it: no temporary
    files or form objects, which cost more than the rest of a small request's parsing (Starlette's
    form parser: 0.07 ms of a 28x28 PNG request here). Raises a 400 for a malformed body and a
    422 for too many files.
    """

    def bad(why: str) -> Refusal:
        return Refusal(400, f"malformed multipart body: {why}")

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise bad("no boundary in the Content-Type header")
    delimiter = b"--" + boundary
    at = body.find(delimiter)
    if at < 0 or (at > 0 and body[at - 2 : at] != b"\r\n"):
        raise bad("no opening boundary")
    at += len(delimiter)
    fields: list[tuple[str, str]] = []
    files: list[tuple[str, str, bytes]] = []
    while True:
        if body[at : at + 2] == b"--":
            return fields, files  # the closing boundary (an epilogue after it is ignored)
        eol = body.find(b"\r\n", at)
        if eol < 0 or body[at:eol].strip(b" \t"):
            raise bad("a boundary line is not followed by a line break")
        head_end = body.find(b"\r\n\r\n", eol)
        end = body.find(b"\r\n" + delimiter, eol)
        if end < 0:
            raise bad("no closing boundary")
        if head_end < 0 or head_end > end:
            head_end, content = end, b""  # a part with headers only
        else:
            content = body[head_end + 4 : end]
        name, filename = None, None
        for line in body[eol + 2 : head_end].split(b"\r\n"):
            key, sep, value = line.partition(b":")
            if not sep:
                raise bad(f"part header without a colon: {line[:60]!r}")
            if key.strip().lower() == b"content-disposition":
                kind, opts = parse_options_header(value.strip())
                if kind.lower() != b"form-data" or b"name" not in opts:
                    raise bad("a part's Content-Disposition is not form-data with a name")
                name = opts[b"name"].decode("utf-8", "replace")
                if b"filename" in opts:
                    filename = opts[b"filename"].decode("utf-8", "replace")
        if name is None:
            raise bad("a part has no Content-Disposition header")
        if filename is not None:
            if len(files) >= max_images + 1:
                raise Refusal(422, f"too many images; at most {max_images} per request")
            files.append((name, filename, content))
        else:
            if len(fields) >= MAX_FORM_FIELDS:
                raise bad(f"more than {MAX_FORM_FIELDS} form fields")
            fields.append((name, content.decode("utf-8", "replace")))
        at = end + 2 + len(delimiter)


def _parse_json(body: bytes) -> ClassifyRequest:
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, 4300+ digit ints
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
            images.append((f"images[{i}]", b64decode(text)))
        except (binascii.Error, ValueError):
            raise Refusal(400, f"images[{i}] is not valid base64") from None
    options = ClassifyOptions(**req.model_dump(exclude={"images", "image"}, exclude_unset=True))
    return ClassifyRequest(images, options)
