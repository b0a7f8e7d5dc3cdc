"""The README's examples run as written from the repository root against a live `snnet serve`
with the bundled weights (only `localhost:8000`/`localhost:8081` become the test server's ports),
and the digits they send are the held-out ones examples/digits/README.md says they are."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from snnet_core.data import mnist_subset
from tests._servers import ROOT

pytestmark = pytest.mark.timing  # `make test` runs it alone (pyproject's markers)

README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def curl_commands() -> list[str]:
    """Every `curl ... localhost:8000` command in the README's bash blocks, continuation lines
    joined."""
    out = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        out += [
            ln.strip() for ln in text.splitlines() if ln.strip().startswith("curl -s localhost")
        ]
    return out


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


def local(text: str, srv) -> str:
    """The README's localhost ports as this test server's."""
    grpc_port = srv.grpc.rsplit(":", 1)[1]
    return text.replace("localhost:8000", f"127.0.0.1:{srv.port}").replace(
        "localhost:8081", f"127.0.0.1:{grpc_port}"
    )


def test_the_example_digits_are_the_held_out_digits_named():
    x, y = mnist_subset("held_out")
    for c in range(10):
        i = int((y == c).nonzero()[0])
        got = np.asarray(Image.open(ROOT / "examples" / "digits" / f"{c}.png"))
        assert (got == (x[i, 0].numpy() * 255).round().astype("uint8")).all(), c


def test_every_curl_example_in_the_readme_answers(server):
    commands = curl_commands()
    assert len(commands) >= 5  # /classify (multipart, JSON), /stitches (2), /controller
    for cmd in commands:
        out = subprocess.run(
            ["bash", "-c", local(cmd, server)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (cmd, out.stderr)
        body = json.loads(out.stdout)
        assert "detail" not in body, (cmd, body)  # no error
        if "/classify" in cmd:
            assert body["predictions"][0][0]["label"] == "7", (cmd, body)


def test_the_readme_python_client_examples_run(server):
    code = "\n".join(b for b in blocks("python") if "tritonclient" in b)
    assert "tritonclient.http" in code and "tritonclient.grpc" in code
    out = subprocess.run(
        [sys.executable, "-c", local(code, server)], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert ":7:7" in out.stdout  # the top class of examples/digits/7.png
