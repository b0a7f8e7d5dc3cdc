"""The HTTP API on a tiny real checkpoint, in process (httpx against the ASGI app)."""

import asyncio
import base64
import io
import json
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import snnet_core
from server.app import create_app
from server.config import Settings
from tests.conftest import TINY_NUM_STITCHES, build_tiny

pytestmark = pytest.mark.timing  # `make test` runs it alone (pyproject's markers)


def png(array, mode="L", fmt="PNG", size=None) -> bytes:
    img = Image.fromarray(array, mode)
    if size:
        img = img.resize(size)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, train_digits):
    d = tmp_path_factory.mktemp("tiny")
    net = build_tiny(seed=7)
    net.init_stitching_layers((train_digits - 0.5) / 0.5)
    manifest = snnet_core.new_manifest(net, labels=[f"digit {i}" for i in range(10)])
    for r in manifest.stitches:
        r["accuracy"] = round(50 + r["gflops"] * 1e5 - 2 * (r["id"] % 3), 2)  # a known ranking
    snnet_core.save(net, d, manifest)
    return d


@pytest.fixture(scope="module")
def client(ckpt, tmp_path_factory):
    settings = Settings(
        weights=ckpt,
        profile_repeats=1,
        max_image_pixels=100_000,
        max_body_bytes=300_000,
        max_image_bytes=200_000,
        max_images_per_request=4,
        profile_cache=tmp_path_factory.mktemp("cache") / "profiles.json",
    )
    app = create_app(settings)
    with TestClient(app) as c:
        life = app.state.lifecycle
        assert life.started.wait(120) and life.engine is not None, life.detail
        yield c


@pytest.fixture(scope="module")
def digit_png(digits):
    return png((digits[0][0, 0].numpy() * 255).round().astype("uint8"))


# The tests whose subject is not where the model runs serve with worker="thread" (the CUDA
# default): no model process to start, 5 s each here. The module's client serves with one.


def test_not_ready_until_started(ckpt, tmp_path, digit_png):
    settings = Settings(
        weights=ckpt, profile_repeats=1, profile_cache=tmp_path / "p.json", worker="thread"
    )
    app = create_app(settings)
    c = TestClient(app)  # no lifespan: nothing has started the model
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    r = c.post("/classify", files=[("image", ("a.png", digit_png, "image/png"))])
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert c.get("/stitches").status_code == 503
    assert c.get("/controller").status_code == 503
    app.state.lifecycle.start()
    assert c.get("/readyz").status_code == 200
    assert (tmp_path / "p.json").is_file()  # the measured profile is kept
    # How the profile was had: the whole story in /stitches, one word in snnet_model_info (a
    # label that changed with every start, as the text does, made a new series each time).
    told = c.get("/stitches").json()["profile"]
    assert told.startswith("measured ") and f"kept in {tmp_path / 'p.json'}" in told, told
    assert 'profile="measured"' in c.get("/metrics").text
    app.state.lifecycle.stop()
    again = create_app(settings)
    c = TestClient(again)
    again.state.lifecycle.start()
    assert c.get("/stitches").json()["profile"].startswith(f"cache {tmp_path / 'p.json'}")
    assert 'profile="cache"' in c.get("/metrics").text
    assert set(c.get("/stitches/0").json()["latency_ms"]) == {"1", "2", "4", "8"}
    again.state.lifecycle.stop()
    # The same cache with smaller batches: the menu shows the sizes this server runs, not all
    # the cache holds.
    small = create_app(settings.model_copy(update={"max_batch_size": 2}))
    c = TestClient(small)
    small.state.lifecycle.start()
    row = c.get("/stitches/0").json()
    assert set(row["latency_ms"]) == set(row["predicted_ms"]) == {"1", "2"}, row
    small.state.lifecycle.stop()


def test_classify_multipart_and_json_agree(client, digit_png):
    r1 = client.post(
        "/classify",
        files=[("image", ("a.png", digit_png, "image/png"))],
        data={"stitch_id": "5", "top_k": "3"},
    )
    r2 = client.post(
        "/classify",
        json={"image": base64.b64encode(digit_png).decode(), "stitch_id": 5, "top_k": 3},
    )
    assert r1.status_code == r2.status_code == 200
    a, b = r1.json(), r2.json()
    assert a["predictions"] == b["predictions"]
    assert len(a["predictions"]) == 1 and len(a["predictions"][0]) == 3
    # Every request has a budget: its own or SNNET_DEFAULT_BUDGET_MS.
    assert a["stitch"]["id"] == 5 and a["latency_budget_ms"] == 1000.0 and a["budget_met"] is True
    p = a["predictions"][0][0]
    assert p["label"] == f"digit {p['class_index']}" and 0 < p["score"] <= 1
    assert set(a["timing"]) == {"queue_ms", "compute_ms", "total_ms", "predicted_ms"}


def test_predictions_match_the_model(client, ckpt, digits):
    net, manifest = snnet_core.load(ckpt)
    imgs = [png((d[0].numpy() * 255).round().astype("uint8")) for d in digits[0][:4]]
    r = client.post(
        "/classify",
        files=[("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)],
        data={"stitch_id": "12", "top_k": "1"},
    )
    assert r.status_code == 200
    x = torch.stack(
        [
            torch.from_numpy(
                __import__("numpy").asarray(Image.open(io.BytesIO(b)), dtype="float32") / 255
            )
            for b in imgs
        ]
    )[:, None]
    with torch.no_grad():
        expected = net((x - 0.5) / 0.5, 12).argmax(-1).tolist()
    assert [p[0]["class_index"] for p in r.json()["predictions"]] == expected


def test_choice_rules(client, digit_png):
    files = [("image", ("a.png", digit_png, "image/png"))]
    stitches = client.get("/stitches").json()["stitches"]
    best = max(stitches, key=lambda s: s["accuracy"])
    r = client.post("/classify", files=files, data={"latency_budget_ms": "60000"}).json()
    assert r["stitch"]["id"] == best["id"] and r["budget_met"]
    cap = sorted(s["gflops"] for s in stitches)[5]
    r = client.post("/classify", files=files, data={"max_gflops": str(cap)}).json()
    under = [s for s in stitches if s["gflops"] <= cap]
    assert r["stitch"]["id"] == max(under, key=lambda s: s["accuracy"])["id"]
    r = client.post("/classify", files=files).json()  # no budget: the server's default applies
    assert r["latency_budget_ms"] == 1000.0


def bomb_png() -> bytes:
    img = Image.new("L", (6_000, 6_000))  # 36 Mpx in about 35 kB of PNG
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` and holds a few bytes of pixels: all that
    Pillow reads before any pixel (past twice its own limit it refuses to open it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        (
            {"content": b"hello", "headers": {"content-type": "text/plain"}},
            415,
            "not supported; send multipart/form-data",
        ),
        ({"json": {"image": "@@@"}}, 400, "images[0] is not valid base64"),
        (
            {"json": {"image": base64.b64encode(b"not an image").decode()}},
            400,
            "images[0] could not be decoded as JPEG, PNG, WebP, BMP or GIF (not one of them)",
        ),
        (
            {"json": {"image": base64.b64encode(b"GIF89a" + b"\0" * 20).decode()}},
            400,
            "could not be decoded",
        ),
        (
            {"content": b"{oops", "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
        ({"json": {}}, 422, "no image given"),
        ({"json": {"images": ["x"], "image": "y"}}, 422, "not both"),
        (
            {"json": {"image": "DIGIT", "stitch_id": 999}},
            422,
            "unknown stitch_id 999; valid ids are 0..22",
        ),
        (
            {"json": {"image": "DIGIT", "latency_budget_ms": -1}},
            422,
            "latency_budget_ms: Input should be greater than 0",
        ),
        (
            {"json": {"image": "DIGIT", "latency_budget_ms": 1e308}},
            422,
            "latency_budget_ms: Input should be less than or equal to 3600000",
        ),
        (
            {"json": {"image": "DIGIT", "latency_budget_ms": 1e-6}},
            422,
            "below the fastest stitch's compute time",
        ),
        ({"json": {"image": "DIGIT", "max_gflops": 1e-12}}, 422, "below the cheapest stitch"),
        (
            {"json": {"image": "DIGIT", "stitch_id": 1, "max_gflops": 1}},
            422,
            "at most one of stitch_id and max_gflops",
        ),
        ({"json": {"image": "DIGIT", "top_k": 11}}, 422, "top_k=11 but the model has 10 classes"),
        (
            {"json": {"image": "DIGIT", "colour": "red"}},
            422,
            "colour: not a field; allowed: ['image', 'images', 'latency_budget_ms', 'max_gflops', "
            "'policy', 'stitch_id', 'top_k'] (got 'red')",
        ),
        (
            {"json": {"image": "DIGIT", "latency_budget_ms": "50"}},
            422,
            "latency_budget_ms: Input should be a valid number: send a JSON number, not a string "
            "(got '50')",
        ),
        ({"json": {"images": ["DIGIT"] * 5}}, 422, "at most 4 per request"),
        ({"json": {"images": []}}, 422, "images: List should have at least 1 item"),
        (
            {"content": b'{"image": "DIGIT", "latency_budget_ms": Infinity}'},
            422,
            "latency_budget_ms: Input should be a finite number",
        ),
        (
            {"json": {"image": "DIGIT", "policy": "most_accurate"}},
            422,
            "SNNET_BASELINE_POLICIES=false",
        ),
        ({"json": {"image": "DIGIT", "policy": "fastest"}}, 422, "policy: Input should be"),
        (
            {"json": {"image": "DIGIT", "stitch_id": False}},
            422,
            "stitch_id: Input should be a valid integer",
        ),
        ({"json": {"image": "DIGIT", "top_k": "3"}}, 422, "top_k: Input should be a valid integer"),
        ({"json": {"image": "BIG"}}, 413, "the limit is 100000 pixels"),
        ({"json": {"image": "BOMB"}}, 413, "pixels"),
        # refused by their headers before planning, whatever the budget: not a 422 for the cost
        # of a decode never run (Pillow's own bomb check: a 422 named 71 ms for a 388 KB PNG of
        # 20000x20000), nor for bytes over the image limit, nor for what is not an image
        (
            {"json": {"image": "HUGE", "latency_budget_ms": 1e-6}},
            413,
            "400000000 pixels by its header (a decompression bomb); the limit is 100000 pixels",
        ),
        (
            {"json": {"image": "HEAVY", "latency_budget_ms": 1e-6}},
            413,
            "images[0] is 200001 bytes; the limit is 200000 bytes",
        ),
        (
            {
                "json": {
                    "image": base64.b64encode(b"not an image").decode(),
                    "latency_budget_ms": 1e-6,
                }
            },
            400,
            "images[0] could not be decoded as JPEG, PNG, WebP, BMP or GIF (not one of them)",
        ),
        # over the pixel limit but flat, so few bytes: its decoding refuses it (413), the plan
        # must not first refuse the decode's cost (a 422 for 4.5 MB of "photo")
        ({"json": {"image": "WIDE", "latency_budget_ms": 50}}, 413, "the limit is 100000 pixels"),
        # under the limit as decoded, far over it once its shorter side is resized to the
        # input's (it took seconds and gigabytes): refused before any resize
        (
            {"json": {"image": "THIN"}},
            413,
            "is 50000x1, which preprocessing would enlarge to",
        ),
        (
            {"content": b"x" * 400_000, "headers": {"content-type": "application/json"}},
            413,
            "the limit is 300000 bytes",
        ),
    ],
)
def test_errors_say_what_is_wrong(client, digit_png, kwargs, status, message):
    if "json" in kwargs or "headers" not in kwargs:
        body = json.dumps(kwargs["json"]) if "json" in kwargs else kwargs["content"].decode()
        b64 = {
            "DIGIT": digit_png,
            "BIG": png(__import__("numpy").zeros((400, 400), "uint8")),
            "BOMB": bomb_png() if "BOMB" in body else b"",
            "WIDE": png(np.full((3000, 3000), 128, "uint8")) if "WIDE" in body else b"",
            "THIN": png(np.full((1, 50000), 128, "uint8")) if "THIN" in body else b"",
            "HUGE": header_only_png(20_000, 20_000),
            "HEAVY": b"\0" * 200_001,
        }
        for k, v in b64.items():
            body = body.replace(f'"{k}"', json.dumps(base64.b64encode(v).decode()))
        kwargs = {"content": body, "headers": {"content-type": "application/json"}}
    r = client.post("/classify", **kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert client.get("/healthz").status_code == 200  # and the service keeps running


def test_multipart_errors(client, digit_png):
    r = client.post(
        "/classify", files=[("image", ("a.png", digit_png, "image/png"))], data={"stitch_id": "abc"}
    )
    assert r.status_code == 422 and "stitch_id" in r.json()["detail"]
    r = client.post("/classify", files=[("photo", ("a.png", digit_png, "image/png"))])
    assert r.status_code == 422 and "unknown form fields ['photo']" in r.json()["detail"]
    r = client.post("/classify", files=[("image", ("a.png", digit_png, "image/png"))] * 6)
    assert r.status_code == 422 and "at most 4" in r.json()["detail"]
    # A field given twice: the last one was taken (50 ms, then 5000 ms, served as 5000).
    r = client.post(
        "/classify",
        files=[
            ("image", ("a.png", digit_png, "image/png")),
            ("latency_budget_ms", (None, "50")),
            ("latency_budget_ms", (None, "5000")),
        ],
    )
    assert r.status_code == 422
    assert r.json()["detail"] == (
        "form fields ['latency_budget_ms'] given more than once; give each field once"
    )
    # A client's name for a part is cut in messages (a 20 KB filename made a 20 KB message).
    r = client.post(
        "/classify", files=[("image", ("x" * 20_000 + ".png", b"not an image", "image/png"))]
    )
    assert r.status_code == 400 and len(r.json()["detail"]) < 200
    assert r.json()["detail"].startswith("x" * 77 + "... could not be decoded")
    # Fields in the query string were silently ignored (the default budget served a request
    # that asked for 5 ms): a 422 that says where they go.
    r = client.post(
        "/classify?latency_budget_ms=5", files=[("image", ("a.png", digit_png, "image/png"))]
    )
    assert r.status_code == 422
    assert r.json()["detail"].startswith(
        "POST /classify reads its fields from the body, not the query string (got "
        "'latency_budget_ms=5'); send them as form fields or JSON members: ['image', "
    )


def test_an_image_is_classified_as_a_viewer_shows_it(client, digits):
    """A digit stored on its side with the EXIF tag that turns it upright (as phones store
    photos), and the same digit as a 16-bit grey PNG: each answered as the plain 8-bit upright
    digit is, score for score (read as stored, the first was a 5 and the second a white image)."""
    eight = (digits[0][0, 0].numpy() * 255).round().astype("uint8")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    turned, deep = io.BytesIO(), io.BytesIO()
    Image.fromarray(eight, "L").transpose(Image.Transpose.ROTATE_90).save(turned, "PNG", exif=exif)
    Image.fromarray(eight.astype("uint16") * 257).save(deep, "PNG")

    def answer(data: bytes) -> dict:
        files = [("image", ("a.png", data, "image/png"))]
        r = client.post("/classify", files=files, data={"stitch_id": "3", "top_k": "10"})
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    want = answer(png(eight))
    assert answer(turned.getvalue()) == want and answer(deep.getvalue()) == want


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF"])
def test_image_formats(client, digits, fmt):
    data = png((digits[0][3, 0].numpy() * 255).round().astype("uint8"), "L", fmt, size=(56, 56))
    r = client.post(
        "/classify", files=[("image", (f"a.{fmt.lower()}", data, "application/octet-stream"))]
    )
    assert r.status_code == 200, r.text


def test_stitches_menu(client):
    body = client.get("/stitches").json()
    assert body["device"] == "cpu" and body["dtype"] == "float32"
    rows = body["stitches"]
    assert [r["id"] for r in rows] == list(range(TINY_NUM_STITCHES))
    r = rows[4]
    assert set(r) >= {
        "id",
        "description",
        "anchors",
        "gflops",
        "params_m",
        "accuracy",
        "latency_ms",
        "pareto",
    }
    assert set(r["latency_ms"]) == {"1", "2", "4", "8"}
    front = client.get("/stitches", params={"pareto": "true"}).json()["stitches"]
    assert 0 < len(front) < len(rows) and all(s["pareto"] for s in front)
    one = client.get("/stitches/4").json()
    # predicted_ms follows the live device factor and margin, which may move between two
    # calls (the idle probe runs in the background); everything else is the menu's row.
    predicted = one.pop("predicted_ms")
    assert one == {k: v for k, v in r.items() if k != "predicted_ms"}
    assert set(predicted) == set(r["latency_ms"]) and all(v > 0 for v in predicted.values())
    assert client.get("/stitches/99").status_code == 404
    assert "valid integer" in client.get("/stitches/x").json()["detail"]


def test_a_server_promising_less_says_so_and_pads_less(ckpt, tmp_path, digit_png):
    """SNNET_SLO_TARGET=0.9: /metrics exports the promise (the shipped alert compares
    attainment with it), /controller shows it and the quantiles it implies, and a fresh
    server's prior margin is the smaller one of a 95% quantile (the default's is 0.2 at 99.5%)."""
    settings = Settings(
        weights=ckpt, profile_repeats=1, profile_cache=tmp_path / "p.json", worker="thread",
        slo_target=0.9,
    )  # fmt: skip
    app = create_app(settings)
    c = TestClient(app)
    app.state.lifecycle.start()
    try:
        assert "\nsnnet_slo_target 0.9\n" in c.get("/metrics").text
        state = c.get("/controller").json()
        # the 422's margin below the full one, so a band of budgets is still served best effort
        assert (state["slo_target"], state["margin_quantile"], state["refuse_quantile"]) == (
            0.9, 0.95, 0.9,
        )  # fmt: skip
        assert state["rest_margin"] == pytest.approx(0.2 * 1.645 / 2.576, rel=1e-3)
        r = c.post("/classify", files=[("image", ("a.png", digit_png, "image/png"))])
        assert r.status_code == 200 and r.json()["budget_met"] is True
    finally:
        app.state.lifecycle.stop()


def test_metrics_exposition(client, digit_png):
    client.post(
        "/classify",
        files=[("image", ("a.png", digit_png, "image/png"))],
        data={"latency_budget_ms": "60000"},
    )
    refused = client.post(
        "/classify",
        files=[("image", ("a.png", digit_png, "image/png"))],
        data={"latency_budget_ms": "0.001"},
    )
    assert refused.status_code == 422
    text = client.get("/metrics").text
    assert "\nsnnet_slo_target 0.99\n" in text  # the default promise
    # Latency by status: an answer's apart from the refusals, which take a fraction of a ms
    # and would pull the percentiles of what clients wait for down.
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith('snnet_request_duration_seconds_count{route="/classify"')
    }
    assert counts['snnet_request_duration_seconds_count{route="/classify",status="422"}'] >= 1
    assert counts['snnet_request_duration_seconds_count{route="/classify",status="200"}'] >= 1
    for name in [
        'snnet_requests_total{route="/classify",status="200"}',
        "snnet_request_duration_seconds_bucket",
        "snnet_queue_wait_seconds_bucket",
        "snnet_compute_seconds_bucket",
        "snnet_batch_size_bucket",
        "snnet_model_cpu_wait_seconds_total",
        "snnet_stitch_chosen_total",
        "snnet_budget_met_total",
        "snnet_budget_missed_total",
        "snnet_shed_total",
        "snnet_queue_depth",
        "snnet_model_info{",
        "snnet_latency_correction",
        "process_resident_memory_bytes",
    ]:
        assert name in text, name
    # The model process, which runs the forwards on CPU: its own CPU time and memory (the
    # HTTP process's alone left most of the work out).
    engine = client.app.state.lifecycle.engine
    assert engine.runner.kind == "process"
    own = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("snnet_model_process_")
    }
    assert own["snnet_model_process_cpu_seconds_total"] > 0
    assert own["snnet_model_process_resident_memory_bytes"] > 0
    started = Path(f"/proc/{engine.runner.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    boot = next(ln for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime"))
    ticks = os.sysconf("SC_CLK_TCK")
    assert own["snnet_model_process_start_time_seconds"] == pytest.approx(
        float(boot.split()[1]) + int(started) / ticks
    )  # that process's, not this one's


def test_a_budget_below_the_promise_is_answered_best_effort_and_counted_apart(
    client, digit_png, monkeypatch
):
    """An idle server whose full safety margin fits no stitch in the budget, but whose margin a
    422 is judged on fits the fastest: answered by the fastest stitch, said in the answer and
    counted in snnet_best_effort_total, not in the attainment (here the full margin is made
    a second, the other none)."""
    engine = client.app.state.lifecycle.engine
    ctl = engine.controller

    def pad_ms(predicted_ms, *, alone=False, refuse=False):
        return 0.0 if refuse else 1000.0

    def counts() -> dict[str, float]:
        text = client.get("/metrics").text
        return {
            name: float(line.split()[1])
            for line in text.splitlines()
            for name in (
                'snnet_best_effort_total{outcome="met"}',
                'snnet_best_effort_total{outcome="missed"}',
                "snnet_budget_met_total",
                "snnet_budget_missed_total",
            )
            if line.startswith(name + " ")
        }

    before = counts()
    monkeypatch.setattr(ctl, "pad_ms", pad_ms)
    fastest = min(engine.menu.ranking, key=lambda s: engine.scheduler.batches_ms(s, 1))
    r = client.post(
        "/classify",
        files=[("image", ("a.png", digit_png, "image/png"))],
        data={"latency_budget_ms": "900"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["best_effort"] is True and body["stitch"]["id"] == fastest
    after = counts()
    outcome = "met" if body["budget_met"] else "missed"
    assert after[f'snnet_best_effort_total{{outcome="{outcome}"}}'] == (
        before[f'snnet_best_effort_total{{outcome="{outcome}"}}'] + 1
    )
    assert after["snnet_budget_met_total"] == before["snnet_budget_met_total"]
    assert after["snnet_budget_missed_total"] == before["snnet_budget_missed_total"]
    monkeypatch.undo()
    r = client.post(
        "/classify",
        files=[("image", ("a.png", digit_png, "image/png"))],
        data={"latency_budget_ms": "900"},
    )
    assert r.status_code == 200 and r.json()["best_effort"] is False
    now = counts()
    answered = now["snnet_budget_met_total"] + now["snnet_budget_missed_total"]
    assert answered == before["snnet_budget_met_total"] + before["snnet_budget_missed_total"] + 1


def test_api_key(ckpt, tmp_path, digit_png):
    app = create_app(
        Settings(
            weights=ckpt,
            api_key="s3cret",
            profile_repeats=1,
            profile_cache=tmp_path / "p.json",
            worker="thread",
        )  # fmt: skip
    )
    with TestClient(app) as c:
        assert app.state.lifecycle.started.wait(120)
        files = [("image", ("a.png", digit_png, "image/png"))]
        assert c.post("/classify", files=files).status_code == 401
        assert c.post("/classify", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_openapi_documents_both_bodies_with_examples(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/classify"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    assert client.get("/docs").status_code == 200
    # Both bodies declare the same options, from one schema; each needs an image.
    form = body["multipart/form-data"]["schema"]
    options = set(form["properties"]) - {"image"}
    json_schema = body["application/json"]["schema"]
    assert options == set(json_schema["properties"]) - {"image", "images"} >= {"policy"}
    assert form["required"] == ["image"] and form["properties"]["image"]["minItems"] == 1
    assert json_schema["oneOf"] == [{"required": ["images"]}, {"required": ["image"]}]
    # The examples are requests the server answers.
    for name, example in body["application/json"]["examples"].items():
        r = client.post("/classify", json=example["value"])
        assert r.status_code == 200, (name, r.text)


def test_every_declared_error_body_is_what_is_sent(client):
    """422s (and the other errors) are {"detail": "..."}, not FastAPI's HTTPValidationError."""
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    # The Open Inference Protocol's routes answer {"error": ...}, as it says.
                    want = ("/V2ErrorResponse",) if path.startswith("/v2") else (
                        "/ErrorResponse", "/ReadyResponse"
                    )  # fmt: skip
                    assert ref.endswith(want), (
                        method,
                        path,
                        status,
                    )
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    r = client.get("/stitches", params={"pareto": "maybe"})
    assert r.status_code == 422 and set(r.json()) == {"detail"}


def test_the_v2_routes_take_a_version_only_in_their_path(client, ckpt, digit_png):
    """The Open Inference Protocol names a version in the path or not at all: `/infer?version=0`
    does not pin a stitch, and the OpenAPI documents no such query parameter."""
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path.startswith("/v2/models/"):
            for op in ops.values():
                where = {(p["name"], p["in"]) for p in op.get("parameters", [])}
                version = {("version", "path")} if "{version}" in path else set()
                assert where == {("name", "path")} | version, path
    image = base64.b64encode(digit_png).decode()
    doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]}
    model = f"/v2/models/{ckpt.name}"
    chosen = client.post(f"{model}/infer", json=doc).json()["model_version"]
    other = "0" if chosen != "0" else "1"
    pinned = client.post(f"{model}/versions/{other}/infer", json=doc)
    assert pinned.status_code == 200 and pinned.json()["model_version"] == other
    query = client.post(f"{model}/infer", params={"version": other}, json=doc)
    assert query.status_code == 200 and query.json()["model_version"] != other


def test_a_sequential_client_with_room_in_its_budget_always_gets_the_best_stitch(
    ckpt, tmp_path, digit_png
):
    """Issue 12: a closed-loop client's arrival rate rises because it is answered fast; that
    must not cost it accuracy while nothing waits. target_utilisation=0.01 makes the controller's
    rate term ask for the cheapest stitch at any rate this client reaches."""
    settings = Settings(
        weights=ckpt, profile_repeats=1, target_utilisation=0.01,
        profile_cache=tmp_path / "p.json", controller_period_s=0.05,
    )  # fmt: skip
    app = create_app(settings)
    with TestClient(app) as c:
        life = app.state.lifecycle
        assert life.started.wait(120) and life.engine is not None
        best = life.engine.menu.ranking[0]
        files = [("image", ("a.png", digit_png, "image/png"))]
        stitches, levels = [], []
        for _ in range(60):
            r = c.post("/classify", files=files, data={"latency_budget_ms": "60000"})
            assert r.status_code == 200, r.text
            stitches.append(r.json()["stitch"]["id"])
            levels.append(c.get("/controller").json()["load_level"])
    assert max(levels) > 0.5  # the rate term was high: the old planner would have narrowed
    assert stitches == [best] * 60


def test_a_profile_cache_given_as_a_directory_is_profiles_json_in_it(tmp_path, monkeypatch):
    """Used as the file, a directory was never written ("Is a directory"): every start
    measured the stitches again."""
    monkeypatch.setenv("SNNET_PROFILE_CACHE", str(tmp_path))
    assert Settings().profile_cache == tmp_path / "profiles.json"
    monkeypatch.setenv("SNNET_PROFILE_CACHE", str(tmp_path / "new") + "/")  # not made yet
    assert Settings().profile_cache == tmp_path / "new" / "profiles.json"
    monkeypatch.setenv("SNNET_PROFILE_CACHE", str(tmp_path / "mine.json"))
    assert Settings().profile_cache == tmp_path / "mine.json"


def test_readme_lists_every_setting():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SNNET_{n.upper()}`" not in readme]
    assert not missing


def test_every_route_has_an_example_in_the_openapi_docs(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def has_example(node) -> bool:
        if isinstance(node, dict):
            if "example" in node or "examples" in node:
                return True
            ref = node.get("$ref")
            if ref and has_example(schemas[ref.split("/")[-1]]):
                return True
            return any(has_example(v) for v in node.values())
        if isinstance(node, list):
            return any(has_example(v) for v in node)
        return False

    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert has_example(op.get("responses", {}).get("200", {})), f"{method.upper()} {path}"


def test_serves_a_resnet_to_swin_checkpoint(tmp_path, digit_png):
    """The service is family-agnostic: a narrowed ResNet-18 -> Swin-T net (64x64 input) serves
    every stitch, with preprocessing from its manifest."""
    from tests.unit.test_families import build

    net = build("resnet_swin", seed=1).eval()
    snnet_core.save(net, tmp_path / "ckpt")
    settings = Settings(
        weights=tmp_path / "ckpt",
        threads=1,
        profile_repeats=1,
        profile_batch_sizes=[1],
        max_batch_size=1,
        profile_cache=tmp_path / "profiles.json",
        worker="thread",
    )
    app = create_app(settings)
    threads = torch.get_num_threads()  # the service sets the process-wide count
    try:
        with TestClient(app) as c:
            assert app.state.lifecycle.started.wait(120) and app.state.lifecycle.engine
            for sid in range(len(net.stitches)):
                r = c.post(
                    "/classify",
                    files=[("image", ("a.png", digit_png, "image/png"))],
                    data={"stitch_id": str(sid), "top_k": "2"},
                )
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["stitch"]["description"] == net.stitches[sid].description
                assert len(body["predictions"][0]) == 2
    finally:
        torch.set_num_threads(threads)


def test_the_api_docs_need_no_cdn(client):
    """/docs and /redoc load their scripts and styles from this server: in an air-gapped cluster
    FastAPI's default pages (a CDN's Swagger UI) are blank."""
    import re

    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)
        assert urls, page
        for url in urls:
            assert url.startswith("/"), (page, url)  # nothing from another host
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 100, (page, url)
    assert "SwaggerUIBundle" in client.get("/docs-assets/swagger-ui-bundle.js").text


def test_routes_prepared_at_start_up_leave_no_trace_in_the_metrics(ckpt, tmp_path):
    """Start-up sends one request through the router (FastAPI builds each router's parsing state
    at the first request into it, which would otherwise land in a client's first request): it
    must not show up as a request in the metrics."""
    from server.app import _prepare_routes

    app = create_app(Settings(weights=ckpt, profile_cache=tmp_path / "p.json"))
    asyncio.run(_prepare_routes(app))
    text = TestClient(app).get("/metrics").text  # no lifespan: the model is not started
    assert "snnet_requests_total{" not in text


def test_a_flat_image_counts_its_pixels_in_the_http_cost_it_is_planned_with(client):
    """Decoding costs by the pixel: a flat image is a few hundred bytes but decodes as a photo of
    its size does (a flat 4000x3000 JPEG of 188 KB was planned at 21 ms and took 191 ms), so its
    plan counts half a byte a pixel."""
    flat = png(np.full((300, 300), 128, dtype=np.uint8))
    assert len(flat) < 5_000

    def refused(budget: float) -> str:
        r = client.post(
            "/classify", files={"image": ("flat.png", flat, "image/png")},
            data={"latency_budget_ms": str(budget)},
        )  # fmt: skip
        assert r.status_code == 422
        return r.json()["detail"]

    # below any compute: the answer names the fastest stitch's time; just above it, what the
    # rest (HTTP work for the image among it) needs
    compute = float(re.search(r"compute time \(([\d.]+) ms", refused(0.001)).group(1))
    assert "sized 45000 bytes" in refused(compute + 0.01)
    r = client.post("/classify", files={"image": ("flat.png", flat, "image/png")})
    assert r.status_code == 200


def test_a_model_of_fewer_classes_than_the_default_top_k_answers_without_one(tmp_path, digit_png):
    """top_k left out is 5, or the class count if fewer: a 3-class model refused every
    request that gave none (the page's, Triton's clients'); one asked for over it is a 422."""
    from tests.conftest import TINY_ANCHORS, TINY_OVERRIDES

    torch.manual_seed(0)
    overrides = [{**o, "num_classes": 3} for o in TINY_OVERRIDES]
    net = snnet_core.build_snnet(TINY_ANCHORS, overrides=overrides)
    snnet_core.save(net, tmp_path / "three", snnet_core.new_manifest(net, labels=["a", "b", "c"]))
    settings = Settings(
        weights=tmp_path / "three", profile_repeats=1, worker="thread",
        profile_cache=tmp_path / "p.json",
    )  # fmt: skip
    app = create_app(settings)
    app.state.lifecycle.start()
    try:
        c = TestClient(app)
        r = c.post("/classify", files=[("image", ("a.png", digit_png, "image/png"))])
        assert r.status_code == 200, r.text
        assert {p["label"] for p in r.json()["predictions"][0]} == {"a", "b", "c"}
        r = c.post("/classify", json={"image": base64.b64encode(digit_png).decode(), "top_k": 4})
        assert r.status_code == 422 and "top_k=4 but the model has 3 classes" in r.text
        doc = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(digit_png).decode()]}]}  # fmt: skip
        r = c.post("/v2/models/three/infer", json=doc)
        assert r.status_code == 200, r.text
        labels = next(o for o in r.json()["outputs"] if o["name"] == "labels")
        assert labels["shape"] == [1, 3]
    finally:
        app.state.lifecycle.stop()
