"""`snnet serve` as a subprocess on a free loopback port, whose log lines can be awaited.

with SnnetServer({"SNNET_PROFILE_CACHE": str(tmp_path / "p.json")}) as srv:
    srv.wait_for("ready in")
    httpx.get(f"{srv.url}/readyz")
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests._prometheus import free_port

SNNET = str(Path(sys.executable).with_name("snnet"))
ROOT = Path(__file__).resolve().parents[1]


class SnnetServer:
    """A `snnet serve` process (`command` defaults to this environment's console script).

    `env` is added to this process's environment (or is the whole environment if not
    `inherit_env`); SNNET_HOST and SNNET_PORT are set here: loopback and a free port.
    """

    def __init__(
        self, env: dict[str, str], command: list[str] | None = None, inherit_env: bool = True
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        listen = {"SNNET_HOST": "127.0.0.1", "SNNET_PORT": str(self.port)}
        # Inheriting: this checkout's code, even if the console script came from another one.
        base = {**os.environ, "PYTHONPATH": str(ROOT)} if inherit_env else {}
        self.proc = subprocess.Popen(
            command or [SNNET, "serve"],
            env={**base, **env, **listen},
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        """Wait for a log line containing `text`; fails with the log if the server exits first."""
        while True:
            line = self.lines.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"server exited before logging {text!r}:\n{''.join(self.log)}")
            self.log.append(line)
            if text in line:
                return

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)

    def __enter__(self) -> SnnetServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def suite_profile_cache(tmp_path_factory) -> str:
    """One profile cache for the servers of this test run that do not test profiling: the first
    to start measures the bundled model here (4-10 s), the others start as a restart does, from
    the cache (calibrated). pytest-xdist's workers share it (their common base directory), and
    so do `make test`'s two runs (it sets SNNET_TEST_PROFILE_CACHE)."""
    given = os.environ.get("SNNET_TEST_PROFILE_CACHE")
    if given:
        return given
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    return str(base / "suite-profiles.json")


def bundled(tmp_path_factory, grpc: bool = False, **env: str) -> Iterator[SnnetServer]:
    """A ready `snnet serve` of the bundled weights with the suite's profile cache, for a module
    fixture (``yield from bundled(tmp_path_factory)``); ``env`` adds settings. With ``grpc``,
    the V2 gRPC endpoint on a free port too, its address in ``srv.grpc``."""
    env = {"SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory), **env}
    grpc_port = free_port() if grpc else 0
    env["SNNET_GRPC_PORT"] = str(grpc_port)
    with SnnetServer(env) as srv:
        srv.grpc = f"127.0.0.1:{grpc_port}" if grpc else None
        srv.wait_for("ready in")
        yield srv


def classify(url: str, pngs: list[bytes], **fields) -> httpx.Response:
    """POST /classify with ``pngs`` as multipart image parts and ``fields`` as form fields."""
    files = [("image", (f"{i}.png", b, "image/png")) for i, b in enumerate(pngs)]
    return httpx.post(
        f"{url}/classify", files=files, data={k: str(v) for k, v in fields.items()}, timeout=60
    )


def sample(metrics: str, name: str) -> float:
    """An unlabelled sample's value in a /metrics text."""
    return float(metrics.split(f"\n{name} ")[1].split()[0])


def ran_and_withdrawn(before: str, after: str) -> tuple[float, float]:
    """Images the model ran, and images taken out of the queue unrun, between two /metrics
    texts."""
    ran, gone = (
        sample(after, name) - sample(before, name)
        for name in ("snnet_batch_size_sum", "snnet_withdrawn_images_total")
    )
    return ran, gone
