"""bench/gpu_wheels.py: the wheels the GPU check carries to a machine that reaches no package
index (the lent H200) are what our dependencies need beyond that machine's image, found from the
installed distributions' metadata, so a dependency added to pyproject travels without anyone
editing a list."""

import importlib.metadata as md
import importlib.util
import subprocess

from tests._servers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "bench" / "gpu_wheels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_wheels_are_what_the_serving_stack_needs_beyond_the_image():
    gw = _module()
    pins = dict(p.split("==") for p in gw.missing("3.12"))
    # each at the version this checkout's tests ran on
    assert all(md.version(name) == version for name, version in pins.items())
    # what `snnet serve` imports that the image lacks: all there
    for name in ("fastapi", "starlette", "pydantic", "pydantic-core", "uvicorn", "httptools",
                 "python-multipart", "fastapi-offline", "tritonclient", "mlxtend"):  # fmt: skip
        assert name in pins, name
    # and nothing the image holds (torch and its stack above all: gigabytes)
    image = gw.image_packages()
    assert {"torch", "torchvision", "timm", "numpy", "pillow", "grpcio"} <= image
    assert not image & set(pins)


def test_a_new_dependency_travels_with_what_it_needs(monkeypatch):
    gw = _module()
    before = {p.split("==")[0] for p in gw.missing("3.12")}
    monkeypatch.setattr(gw, "EXTRA_ROOTS", [*gw.EXTRA_ROOTS, "schemathesis"])
    after = {p.split("==")[0] for p in gw.missing("3.12")}
    assert "schemathesis" in after and "schemathesis" not in before
    assert len(after - before) > 1  # and its own dependencies the image lacks


def test_the_gpu_check_scripts_parse():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "bench" / script)], capture_output=True)
        assert r.returncode == 0, r.stderr
