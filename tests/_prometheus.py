"""A real Prometheus server for tests: started on a free loopback port, queried, stopped.

    with Prometheus({"scrape_configs": [...], "rule_files": [...]}, tmp_path) as prom:
        prom.wait_for('up{job="snnet"} == 1')
        prom.query("sum(rate(snnet_requests_total[1m]))")  # -> list of result samples

Rule files in the config must be absolute paths (Prometheus resolves relative ones against the
config file, which lives in the temporary directory). Needs the `prometheus` binary (Debian
package `prometheus`; `.ci/run` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml


class PromQLError(AssertionError):
    """Prometheus refused a query; the message is Prometheus's own (e.g. the parse error)."""


def require_binary(name: str) -> str:
    """Path of a Prometheus binary. Missing: skip on a developer's machine, fail in CI (CI set)."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} not found: install it with `apt-get install prometheus` (Debian package)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """One `prometheus` process with `config` (a dict, as prometheus.yml) and storage in `workdir`.

    `url` and `port` are known before `start()`, so the config may refer to them.
    """

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.binary = require_binary("prometheus")
        self.config, self.workdir = config, Path(workdir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> Prometheus:
        """Start and wait until /-/ready answers 200 (config and rules loaded)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(self.config))
        self.log = (self.workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # another process starting up: polling /-/ready is the only signal
        self.stop()
        raise TimeoutError(f"prometheus not ready after {timeout}s:\n{self.logs()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query now; the `result` list (vector samples, or one scalar/string as a list).

        Raises:
            PromQLError: Prometheus answered with an error (bad PromQL, execution error).
        """
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise PromQLError(f"{body.get('errorType')}: {body.get('error')}\n  in: {expr}")
        data = body["data"]
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def wait_for(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll `expr` until it returns a non-empty result; that result."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no data for {expr!r} after {timeout}s")
            time.sleep(0.2)  # data appears at the next scrape of another process; re-query

    def logs(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 10 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.log.close()

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
