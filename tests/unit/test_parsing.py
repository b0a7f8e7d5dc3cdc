"""The in-memory multipart/form-data parser of /classify."""

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
