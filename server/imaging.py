"""Decode, validate and preprocess request images, exactly as the checkpoint's manifest says."""

from __future__ import annotations

import contextlib
import io
import re
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from snnet_core import image_transform
from snnet_core.data import IMAGE_FORMATS

# The only decoders Pillow may try (phones' multi-picture JPEGs, "MPO", open through JPEG's):
# those training reads too.
OPEN_FORMATS = IMAGE_FORMATS


# A photo as a JPEG at quality 90 takes about half a byte a pixel (the photo-like 500x375 image
# of ``decode_cost_points``: 102414 bytes, 0.55 a pixel). Decoding costs by the pixel, but the
# HTTP cost line (``server.ingress``) is learnt against the encoded size: an image whose header
# says it has more pixels than its bytes suggest (flat areas, screenshots) counts as a photo of
# its pixel count. A flat 4000x3000 JPEG of 188 KB was planned at 21 ms and took 191 ms.
PHOTO_BYTES_PER_PIXEL = 0.5


class ImageError(ValueError):
    """A request image that cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def open_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    name: str = "image",
    work_pixels: Callable[[int, int], int] | None = None,
) -> Image.Image:
    """Bytes to an opened PIL image, its header read and no pixel decoded, refusing what
    ``decode_image`` would refuse without decoding: over the byte limit, empty, not an image of
    the allowed formats, over the pixel limit by its header (a decompression bomb), or (given
    the transform's ``work_pixels``) enlarged past ``max_pixels`` by its preprocessing (a long
    thin image, whose shorter side is resized up to the model's input). The request parsers
    call it before planning: a 413 or 400 at once, not a 422 that names a least budget for a
    decode never run, or a 503 under load for an image no retry can get through.

    Raises:
        ImageError: 413 over the byte or pixel limit, 400 not an image of those formats.
    """
    if len(data) > max_bytes:
        raise ImageError(413, f"{name} is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data:
        raise ImageError(400, f"{name} is empty; send a JPEG, PNG, WebP, BMP or GIF image")
    with _refused(name, max_pixels):
        # Only the allowed decoders are tried; the size check comes before any pixel is decoded.
        img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageError(
                413, f"{name} is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels"
            )
        # What its resize makes, against the same limit, or what any square image's makes if
        # that is more (a tiny limit refuses no square image for its resize)
        if (
            work_pixels is not None
            and (work := work_pixels(w, h)) > max_pixels
            and work > work_pixels(1, 1)
        ):
            raise ImageError(
                413,
                f"{name} is {w}x{h}, which preprocessing would enlarge to {work} pixels (its "
                f"shorter side resized to the model's input); the limit is {max_pixels} pixels: "
                f"send it cropped nearer to square",
            )
    return img


def decode_image(data: bytes, **limits: Any) -> Image.Image:
    """Bytes to a decoded PIL image (first frame of a GIF), after ``open_image(data, **limits)``'s
    checks.

    Raises:
        ImageError: 413 over the byte or pixel limit, 400 undecodable or unsupported format.
    """
    img = open_image(data, **limits)
    with _refused(limits.get("name", "image"), limits["max_pixels"]):
        img.seek(0)  # first frame of an animation
        img.load()
    return img


def checked_size(data: bytes, **limits: Any) -> int:
    """``open_image(data, **limits)``'s checks, and the size the image counts as in the HTTP
    cost line: its bytes, or its pixels (read from its header, nothing decoded) x
    ``PHOTO_BYTES_PER_PIXEL`` if that is more.

    Raises:
        ImageError: as ``open_image``.
    """
    w, h = open_image(data, **limits).size
    return max(len(data), int(w * h * PHOTO_BYTES_PER_PIXEL))


@contextlib.contextmanager
def _refused(name: str, max_pixels: int) -> Iterator[None]:
    """Pillow's errors in opening or decoding an image, as the ImageError to answer with."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own check, in open(): far over ours
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(size[1])} pixels" if size else "more pixels than Pillow decodes"
        raise ImageError(
            413,
            f"{name} is {pixels} by its header (a decompression bomb); the limit is "
            f"{max_pixels} pixels",
        ) from None
    except UnidentifiedImageError:  # (its text names a Python object: "<_io.BytesIO at 0x..>")
        raise ImageError(
            400, f"{name} could not be decoded as JPEG, PNG, WebP, BMP or GIF (not one of them)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            400, f"{name} could not be decoded as JPEG, PNG, WebP, BMP or GIF ({e})"
        ) from None


def make_transform(pre: dict):
    """PIL image -> normalised (C, H, W) float32 tensor, per the manifest's preprocessing: the
    same function training and evaluation use (``snnet_core.data.image_transform``)."""
    return image_transform(pre, training=False, normalize=True)


def _photo(height: int, width: int, gen: np.random.Generator) -> np.ndarray:
    """A photo-like RGB image: smooth gradients and sensor-like noise (encodes like a photo)."""
    yy, xx = np.mgrid[0:height, 0:width]
    photo = np.stack(
        [xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], -1
    )
    return np.clip(photo + gen.normal(0, 24, photo.shape), 0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, quality=90)
    return buf.getvalue()


def _decode_ms(transform, data: bytes, pixels: int, repeats: int) -> float:
    """Median ms to decode ``data`` and preprocess it, as a request's image is."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        transform(decode_image(data, max_bytes=len(data), max_pixels=pixels))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def decode_cost_points(transform, repeats: int = 5) -> list[tuple[int, float]]:
    """(encoded bytes, ms to decode and preprocess) for a 28x28 PNG and a 500x375 photo-like
    JPEG, measured here: the start of the HTTP cost line (``server.ingress``), which answered
    requests then correct."""
    gen = np.random.default_rng(0)
    photo = _encoded(_photo(375, 500, gen), "JPEG")
    small = _encoded(gen.integers(0, 255, (28, 28), dtype=np.uint8), "PNG")
    return [
        (
            checked_size(data, max_bytes=len(data), max_pixels=500 * 375),
            _decode_ms(transform, data, 500 * 375, repeats),
        )
        for data in (small, photo)
    ]


def input_decode_ms(transform, input_size: tuple[int, ...], repeats: int = 5) -> float:
    """ms to decode and preprocess one image of the model's input size (C, H, W), measured here:
    the least image work a request to this model brings. A PNG up to 64 px a side (digits,
    icons), a photo-like JPEG above; greyscale if the model takes one channel."""
    _, height, width = input_size
    gen = np.random.default_rng(0)
    array = _photo(height, width, gen)
    if input_size[0] == 1:
        array = array.mean(-1).astype(np.uint8)
    data = _encoded(array, "PNG" if max(height, width) <= 64 else "JPEG")
    _decode_ms(transform, data, height * width, 1)  # first-call costs are not per request
    return _decode_ms(transform, data, height * width, repeats)
