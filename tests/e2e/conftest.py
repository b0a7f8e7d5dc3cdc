"""Fixtures the end-to-end modules share."""

import io

import pytest
from PIL import Image

from snnet_core.data import mnist_subset
from tests._servers import bundled


@pytest.fixture(scope="session")
def held_out():
    """16 real held-out digits (the per-request limit), one or two of each class: their PNGs,
    labels and pixels (N, 1, 28, 28) in [0, 1]."""
    x, y = mnist_subset("held_out")
    idx = list(range(5, 1000, 63))
    pngs = []
    for i in idx:
        buf = io.BytesIO()
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(buf, "PNG")
        pngs.append(buf.getvalue())
    return pngs, y[idx].tolist(), x[idx]


@pytest.fixture(scope="package")
def shared_server(tmp_path_factory):
    """One `snnet serve` of the bundled weights with the default settings (and the V2 gRPC
    endpoint) for the modules that only send it requests, stopped when this package's tests
    end: a start costs 11-13 s of the suite here. Modules that change settings, or that test
    start-up, stopping or load, start their own."""
    yield from bundled(tmp_path_factory, grpc=True)
