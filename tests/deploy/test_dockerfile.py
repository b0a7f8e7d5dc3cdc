"""The Dockerfile's own commands, run outside Docker in a fresh virtual environment.

There is no Docker engine here, so this test reads the Dockerfile and replays it: each COPY of
the build stage copies the same files from the repository, each RUN runs with /bin/sh in a
fresh `python -m venv` (Docker's paths /opt/venv, /src, /app, /var/cache/snnet mapped to
temporary directories), then the runtime stage's weights COPY and ENV, its ENTRYPOINT (a real
`snnet serve`, answering /readyz and /classify) and its HEALTHCHECK command.

What it proves:
- the dependency list extracted from pyproject.toml, with `-c constraints.txt`, resolves from
  scratch (pip --dry-run --ignore-installed against this machine's package index instead of the
  PyTorch CPU index, which cannot be reached from here) to the pinned torch/torchvision/timm;
- the same pip command line then runs for real with `--no-index` and finds every requirement
  satisfied by exactly the distributions that resolution picked (linked in from this test's
  environment rather than downloaded: torch alone is gigabytes), so nothing outside the
  requirement set (dev or train extras) is visible to the image's code;
- `pip install --no-deps .` builds and installs the package from only the files the Dockerfile
  copies, non-editable, with the `snnet` console script;
- the entry point serves the bundled weights copied where the Dockerfile puts them, with the
  image's environment, a profile cache in the volume's directory, and the health check passes.

What it cannot prove without Docker: the base images, the PyTorch CPU (or CUDA) index and its
wheels, `useradd` and running as that user (this test runs as whoever runs pytest), file
ownership, the HEALTHCHECK timing options and Docker's layer caching.
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
from PIL import Image

from tests._servers import SnnetServer

ROOT = Path(__file__).resolve().parents[2]
DEPS_LINE = re.compile(r"--extra-index-url \$\{TORCH_INDEX\}")


def parse(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction; continuation lines joined, comments dropped."""
    instructions, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or (not buf and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (buf + line).strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buf = ""
    return instructions


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    named, current = {}, None
    for keyword, args in instructions:
        if keyword == "FROM":
            current = named.setdefault(args.split()[-1], [])
        elif current is not None:
            current.append((keyword, args))
    return named


def env_pairs(args: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in shlex.split(args))


def run(cmd: str, cwd: Path, env: dict[str, str]) -> str:
    out = subprocess.run(
        ["/bin/sh", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def link_distributions(report: dict, into: Path, site: Path) -> list[str]:
    """Make the distributions of a pip install report importable from `into`; those that the
    fresh venv `site` already has (setuptools) are returned as `name==version` to install."""
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().split() if "==" in line
    )
    into.mkdir()
    in_venv = {
        d.metadata["Name"].lower() for d in importlib.metadata.distributions(path=[str(site)])
    }
    to_install = []
    for item in report["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name.lower() in in_venv:
            to_install.append(f"{name}=={version}")
            continue
        dist = importlib.metadata.distribution(name)  # not installed here: run `make setup`
        if name.lower() in pins:
            assert dist.version.split("+")[0] == pins[name.lower()] == version, name
        for top in {f.parts[0] for f in dist.files or ()}:
            if top not in ("..", "__pycache__") and not (into / top).exists():
                (into / top).symlink_to(dist.locate_file(top))
    return to_install


def test_dockerfile_commands_build_a_serving_environment(tmp_path):
    dockerfile = stages(parse((ROOT / "Dockerfile").read_text()))
    build, runtime = dockerfile["build"], dockerfile["runtime"]
    args = dict(
        a.split("=", 1)
        for k, a in parse((ROOT / "Dockerfile").read_text())
        if k == "ARG" and "=" in a
    )
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"

    paths = {
        p: tmp_path / p.strip("/").replace("/", "_")
        for p in ("/opt/venv", "/src", "/app", "/var/cache/snnet")
    }

    def mapped(s: str) -> str:
        for docker_path, here in paths.items():
            s = s.replace(docker_path, str(here))
        return s

    # The base image's `python` (3.11, like python:3.11-slim): this test's base interpreter.
    shim = tmp_path / "base-bin"
    shim.mkdir()
    (shim / "python").symlink_to(sys._base_executable)
    home = tmp_path / "home"
    home.mkdir()
    # This machine's pip configuration (index, find-links) applies; nothing of this test's venv.
    env = {k: v for k, v in os.environ.items() if k.startswith("PIP_")}
    env |= {"PATH": f"{shim}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(home))}
    cwd = tmp_path
    deps_lines = 0
    for keyword, args_ in build:
        if keyword == "ENV":
            env |= {k: mapped(v).replace("$PATH", env["PATH"]) for k, v in env_pairs(args_).items()}
        elif keyword == "WORKDIR":
            cwd = Path(mapped(args_))
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, dest = args_.split()
            for src in sources:
                target = cwd / dest if dest.endswith("/") or dest == "." else cwd / dest
                copy = shutil.copytree if (ROOT / src).is_dir() else shutil.copy
                copy(ROOT / src, target / src if dest.endswith("/") else target)
        elif keyword == "RUN" and DEPS_LINE.search(args_):
            deps_lines += 1
            assert "-c constraints.txt" in args_
            cmd = mapped(args_)
            report = tmp_path / "report.json"
            run(
                DEPS_LINE.sub("--dry-run --ignore-installed --quiet --report " + str(report), cmd),
                cwd,
                env,
            )
            site = next((paths["/opt/venv"] / "lib").glob("python3.*/site-packages"))
            report = json.loads(report.read_text())
            upgrades = link_distributions(report, tmp_path / "deps", site)
            if upgrades:  # small (setuptools): installed for real, as the image build does
                run("python -m pip install --quiet " + " ".join(upgrades), cwd, env)
            (site / "requirements-from-report.pth").write_text(f"{tmp_path / 'deps'}\n")
            run(DEPS_LINE.sub("--no-index", cmd), cwd, env)
        elif keyword == "RUN":
            run(mapped(args_), cwd, env)
        else:
            assert keyword in {"ARG"}, f"build stage: {keyword} is not replayed by this test"
    assert deps_lines == 1

    # The runtime stage: the venv is already in place; copy the weights, set the environment.
    run_env = {"PATH": env["PATH"].replace(f"{shim}:", ""), "HOME": str(home)}
    for keyword, args_ in runtime:
        if keyword == "COPY" and not args_.startswith("--from=build"):
            *sources, dest = args_.split()
            Path(mapped(dest)).mkdir(parents=True, exist_ok=True)
            for src in sources:
                shutil.copy(ROOT / src, Path(mapped(dest)))
        elif keyword == "ENV":
            run_env |= {
                k: mapped(v).replace("$PATH", run_env["PATH"]) for k, v in env_pairs(args_).items()
            }
        elif keyword == "HEALTHCHECK":
            healthcheck = args_.split(" CMD ", 1)[1]
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(args_)
    paths["/var/cache/snnet"].mkdir()
    # The package imported is the one installed into the fresh venv, not this checkout.
    where = run("python -c 'import server; print(server.__file__)'", home, run_env)
    assert where.startswith(str(paths["/opt/venv"])), where

    command = [shutil.which(entrypoint[0], path=run_env["PATH"]), *entrypoint[1:]]
    # A batch size that the manifest's profile lacks, so the server measures one and keeps it in
    # the profile cache volume (proving the image's cache path is used and writable).
    measure = {"SNNET_PROFILE_REPEATS": "1", "SNNET_PROFILE_BATCH_SIZES": "[1, 3]"}
    with SnnetServer({**run_env, **measure}, command, inherit_env=False) as srv:
        srv.wait_for("ready in")
        # SnnetServer moved SNNET_HOST/SNNET_PORT to loopback and a free port; so does the check.
        run(healthcheck, home, {**run_env, "SNNET_PORT": str(srv.port)})
        assert httpx.get(f"{srv.url}/readyz").status_code == 200
        png = io.BytesIO()
        Image.new("L", (28, 28), 255).save(png, "PNG")
        r = httpx.post(
            f"{srv.url}/classify",
            json={"images": [base64.b64encode(png.getvalue()).decode()]},
            timeout=30,
        )
        assert r.status_code == 200, r.text
    assert any(f"kept in {paths['/var/cache/snnet']}/profiles.json" in line for line in srv.log)


def test_dockerignore_sends_exactly_what_the_dockerfile_copies():
    """.dockerignore excludes everything, then re-includes the COPY sources (a build context
    without the venv, tests and training data is small and does not bust the cache)."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        src.rstrip("/")
        for keyword, args in parse((ROOT / "Dockerfile").read_text())
        if keyword == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    }
    assert copied == included
