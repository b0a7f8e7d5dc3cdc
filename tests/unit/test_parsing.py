"""The in-memory multipart/form-data parser of /classify."""

import base64
import random

import pytest

from server.errors import Refusal
from server.parsing import _split_multipart

CT = "multipart/form-data; boundary=XyZ"


def body(*parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble + b"".join(b"--XyZ\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--" + epilogue
    return out


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


def file(name: str, filename: str, data: bytes) -> bytes:
    return (
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data


def test_fields_and_files_come_back_as_sent_with_binary_content_intact():
    # "--XyZ" after a bare LF is content: a delimiter starts with CRLF.
    png = b"\x89PNG\r\n\x1a\n--XyZ not a boundary\r\n-XyZ" + bytes(range(256))
    fields, files = _split_multipart(
        CT,
        body(field("latency_budget_ms", b"50"), file("image", 'd;"1".png', png),
             file("image", "", b"\r\n"), preamble=b"ignored\r\n", epilogue=b"\r\nignored"),
        max_images=4,
    )  # fmt: skip
    assert fields == [("latency_budget_ms", "50")]
    assert files == [("image", 'd;"1".png', png), ("image", "", b"\r\n")]


def test_a_quoted_boundary_and_an_empty_value():
    fields, files = _split_multipart(
        'multipart/form-data; boundary="XyZ"', body(field("top_k", b"")), max_images=1
    )
    assert fields == [("top_k", "")] and files == []


@pytest.mark.parametrize(
    ("content_type", "raw", "message"),
    [
        ("multipart/form-data", body(field("a", b"1")), "no boundary"),
        (CT, b"--Other\r\n" + field("a", b"1") + b"\r\n--Other--", "no opening boundary"),
        (CT, b"--XyZ\r\n" + field("a", b"1"), "no closing boundary"),
        (CT, body(b"Content-Type: text/plain\r\n\r\nx"), "no Content-Disposition"),
        (CT, body(b"Content-Disposition: attachment; name=a\r\n\r\nx"), "not form-data"),
        (CT, body(b"garbage header\r\n\r\nx"), "without a colon"),
        (CT, b"--XyZjunk\r\n" + field("a", b"1") + b"\r\n--XyZ--", "not followed by a line"),
    ],
)
def test_malformed_bodies_are_a_400_that_says_what_is_wrong(content_type, raw, message):
    with pytest.raises(Refusal) as e:
        _split_multipart(content_type, raw, max_images=4)
    assert e.value.status == 400 and message in e.value.detail


def test_too_many_files_and_fields():
    with pytest.raises(Refusal) as e:
        _split_multipart(CT, body(*[file("image", "d.png", b"x")] * 4), max_images=2)
    assert e.value.status == 422 and "at most 2" in e.value.detail
    with pytest.raises(Refusal) as e:
        _split_multipart(CT, body(*[field(f"f{i}", b"1") for i in range(17)]), max_images=2)
    assert e.value.status == 400 and "more than 16 form fields" in e.value.detail


def reference_parts(raw: bytes, rng: random.Random) -> list[bytes]:
    """Each part's content as python-multipart's streaming parser finds it, fed in random chunks."""
    from python_multipart import MultipartParser

    seen: list[bytes] = []
    current = bytearray()

    def on_part_data(d, start, end):
        current.extend(d[start:end])

    def on_part_end():
        seen.append(bytes(current))
        current.clear()

    parser = MultipartParser(b"XyZ", {"on_part_data": on_part_data, "on_part_end": on_part_end})
    i = 0
    while i < len(raw):
        step = rng.randint(1, 64)
        parser.write(raw[i : i + step])
        i += step
    parser.finalize()
    return seen


def test_it_agrees_with_python_multipart_on_random_bodies():
    """Random parts whose content looks like boundaries and line breaks: both parsers find the
    same contents, file parts byte for byte and in order."""
    rng = random.Random(0)
    for _ in range(300):
        parts, contents = [], []
        for k in range(rng.randint(1, 5)):
            data = b"--XyZ"
            while b"--XyZ" in data:  # the boundary never occurs in content (RFC 2046)
                data = bytes(rng.choice(b"\r\n-XyZab\x00\xff") for _ in range(rng.randint(0, 40)))
            is_file = rng.random() < 0.6
            parts.append(file("image", f"{k}.png", data) if is_file else field(f"f{k}", data))
            contents.append((is_file, data))
        fields, files = _split_multipart(CT, body(*parts), max_images=10)
        assert reference_parts(body(*parts), rng) == [d for _, d in contents]
        assert [d for *_, d in files] == [d for is_file, d in contents if is_file]
        assert [v for _, v in fields] == [
            d.decode("utf-8", "replace") for is_file, d in contents if not is_file
        ]


# -- the Open Inference Protocol's request parts (server/routes/v2.py) -------------------------


def v2_refusal(fn, *args) -> Refusal:
    with pytest.raises(Refusal) as e:
        fn(*args)
    return e.value


def test_v2_inputs_that_are_not_what_the_protocol_says_are_4xx_never_500():
    from server.routes.v2 import _images, _options, _outputs, _preprocessed

    b64 = base64.b64encode(b"x").decode()
    cases = [
        (_images, {"datatype": "BYTES", "shape": [True]}, [b64], 4),  # a bool is not a size
        (_images, {"datatype": "BYTES", "shape": [2**62, 2**62]}, [b64], 4),  # no wrap-around
        (_images, {"datatype": "BYTES", "shape": [5_000_000]}, memoryview(bytes(20_000_000)), 4),
        (_images, {"datatype": "BYTES", "shape": [1]}, [b64, b64], 4),
        (_images, {"datatype": "BYTES", "shape": [1]}, [[[[[[[[[[b64]]]]]]]]]], 4),
        (_images, {"datatype": "BYTES", "shape": [1]}, memoryview(b"\x01\x00\x00\x00ab"), 4),
        (
            _preprocessed,
            {"datatype": "FP32", "shape": [1, 1, 2, 2]},
            [10**400, 0, 0, 0],
            (1, 2, 2),
            4,
        ),
        (_preprocessed, {"datatype": "FP32", "shape": [9, 1, 2, 2]}, [0.0] * 36, (1, 2, 2), 4),
        (_preprocessed, {"datatype": "FP32", "shape": [1, 1, 2, 2]}, {"a": 1}, (1, 2, 2), 4),
        (_outputs, {"outputs": [{"name": "labels", "parameters": 5}]}, {}, 10),
        (_outputs, {"outputs": [{"name": "labels"}, {"name": "labels"}]}, {}, 10),
        (_outputs, {}, {"binary_data_output": "false"}, 10),
        (_outputs, {"outputs": [{"name": "labels", "parameters": {"binary_data": "no"}}]}, {}, 10),
        (
            _outputs,
            {"outputs": [{"name": "labels", "parameters": {"classification": True}}]},
            {},
            10,
        ),
        (_options, {"timeout": True}, None),
        (_options, {"timeout": 10**400}, None),
    ]
    for fn, *args in cases:
        if fn in (_images, _preprocessed):
            args[0] = {"name": "x", **args[0]}
        assert 400 <= v2_refusal(fn, *args).status < 500, (fn.__name__, args)
    # And an empty outputs list means every output, as Triton does.
    assert set(_outputs({"outputs": []}, {}, 10)) == {"probabilities", "labels"}


def test_v2_versions_and_lengths_are_ascii_digits_only():
    from server.routes.v2 import _is_index

    assert (
        _is_index("12")
        and not _is_index("\u00b2")
        and not _is_index("\u0663")
        and not _is_index("")
    )


def test_a_budget_is_at_most_an_hour_and_a_longer_v2_timeout_is_no_limit():
    """1e308 ms as a budget made the controller's mean budget (its queue load's scale) and the
    budget histogram meaningless for every request after it."""
    from pydantic import ValidationError

    from server.routes.v2 import _options
    from server.schemas import MAX_BUDGET_MS, ClassifyOptions

    assert ClassifyOptions(latency_budget_ms=MAX_BUDGET_MS).latency_budget_ms == MAX_BUDGET_MS
    with pytest.raises(ValidationError, match="less than or equal to 3600000"):
        ClassifyOptions(latency_budget_ms=MAX_BUDGET_MS * 2)
    assert _options({"timeout": 5_000}, None).latency_budget_ms == 5.0  # microseconds
    assert _options({"timeout": 10**11}, None).latency_budget_ms == MAX_BUDGET_MS
    with pytest.raises(Refusal, match="an integer from 1 to 999999999999 .*; got 10000000000000"):
        _options({"timeout": 10**13}, None)  # (it used to say "a positive integer")


def test_a_v2_shape_that_disagrees_with_its_data_says_which_way():
    from server.routes.v2 import _images

    b64 = base64.b64encode(b"x").decode()
    few = v2_refusal(_images, {"name": "image", "datatype": "BYTES", "shape": [2]}, [b64], 4)
    assert few.detail == "input 'image': shape [2] but only 1 elements"  # not "1 or more"
    many = v2_refusal(_images, {"name": "image", "datatype": "BYTES", "shape": [1]}, [b64] * 3, 4)
    assert many.detail == "input 'image': shape [1] but more than 1 elements"


def test_a_decompression_bomb_is_a_413_that_names_the_servers_own_pixel_limit():
    """Pillow refuses a header of 10^10 pixels itself, in open(); the answer used to quote its
    limit (178956970 pixels), not SNNET_MAX_IMAGE_PIXELS."""
    import struct
    import zlib

    from server.imaging import ImageError, decode_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)  # 8-bit grey
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
           + chunk(b"IEND", b""))  # fmt: skip
    with pytest.raises(ImageError) as e:
        decode_image(png, max_bytes=10_000, max_pixels=20_000_000, name="images[0]")
    assert e.value.status == 413
    assert e.value.detail == (
        "images[0] is 10000000000 pixels by its header (a decompression bomb); the limit is "
        "20000000 pixels"
    )


def test_a_gzip_or_deflate_body_is_inflated_within_the_limit():
    import gzip
    import zlib

    from server.parsing import inflate

    body = b'{"images": ["x"]}' * 100
    assert inflate(gzip.compress(body), "gzip", 10_000) == body
    assert inflate(zlib.compress(body), "Deflate", 10_000) == body  # Triton's client: zlib
    with pytest.raises(Refusal) as e:  # 10 MB of zeros in 10 KB: a bomb
        inflate(gzip.compress(bytes(10_000_000)), "gzip", 1_000_000)
    assert e.value.status == 413 and "decompresses to over the limit of 1000000" in e.value.detail
    with pytest.raises(Refusal) as e:
        inflate(body, "gzip", 10_000)
    assert e.value.status == 400 and "not valid compressed data" in e.value.detail
    # Several gzip members (pigz, files joined) are one body, as gzip reads them.
    assert inflate(gzip.compress(body) + gzip.compress(b"tail"), "gzip", 10_000) == body + b"tail"
    with pytest.raises(Refusal) as e:  # the limit counts every member
        inflate(gzip.compress(body) + gzip.compress(bytes(9_000)), "gzip", 10_000)
    assert e.value.status == 413
    with pytest.raises(Refusal) as e:  # garbage after a member is not silently dropped
        inflate(gzip.compress(body) + b"junk", "gzip", 10_000)
    assert e.value.status == 400
    with pytest.raises(Refusal) as e:
        inflate(gzip.compress(body)[:-20], "gzip", 10_000)
    assert e.value.status == 400 and "ends early" in e.value.detail
    with pytest.raises(Refusal) as e:
        inflate(body, "br", 10_000)
    assert e.value.status == 415 and "send the body uncompressed, or as gzip or deflate" in str(
        e.value.detail
    )
