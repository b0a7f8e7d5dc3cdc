"""Start `snnet serve` on a free loopback port for a benchmark and wait until it is ready."""

from __future__ import annotations

import io
import os
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

SNNET = str(Path(sys.executable).with_name("snnet"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    env: dict[str, str] | None = None, log: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`snnet serve` on a free port with a fresh profile cache; returns when it is ready. The
    log lines up to then are appended to ``log`` if given."""
    port = free_port()
    cache = Path(tempfile.mkdtemp()) / "profiles.json"
    proc = subprocess.Popen(
        [SNNET, "serve", "--port", str(port), "--host", "127.0.0.1"],
        env={
            **os.environ, "SNNET_PROFILE_CACHE": str(cache), "SNNET_GRPC_PORT": "0",
            **(env or {}),
        },  # fmt: skip
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    for line in proc.stderr:
        if log is not None:
            log.append(line)
        if "ready in" in line:
            break
        if "Traceback" in line or "error:" in line:
            raise SystemExit(f"server failed to start: {line}")
    else:
        raise SystemExit("server exited before it was ready")
    # Keep draining the log so the server never blocks on a full pipe.
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
    return proc, f"http://127.0.0.1:{port}"


def start_script(args: list[str], probe: str, timeout_s: float = 120.0):
    """``python *args`` (a server script whose last argument is its port, chosen here), polled
    on ``probe`` until it answers; returns (process, url)."""
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, *args, str(port)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:  # such scripts log nothing at warning level: poll until one answers
        try:
            Client(url).get(probe)
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{args[0]} did not start") from None
            time.sleep(0.05)


def held_out_digits(n: int) -> list[tuple[bytes, int]]:
    """``n`` held-out MNIST digits spread over the split, as (PNG, true label)."""
    from snnet_core.data import mnist_subset

    x, y = mnist_subset("held_out")
    out = []
    for i in range(0, len(x), max(1, len(x) // n))[:n]:
        buf = io.BytesIO()
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(buf, "PNG")
        out.append((buf.getvalue(), int(y[i])))
    return out


def digit_pngs(n: int = 32) -> list[bytes]:
    return [png for png, _ in held_out_digits(n)]


class Client:
    """A keep-alive HTTP/1.1 client on the standard library: far less client-side CPU per request
    than httpx, which matters when client and server share two cores."""

    def __init__(self, url: str) -> None:
        import http.client
        from urllib.parse import urlparse

        u = urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)

    def classify(
        self, png: bytes | list[bytes], query: str = "", **fields: object
    ) -> tuple[int, dict]:
        """POST /classify (``?query`` if given) with one image (or several) as multipart parts;
        (status, JSON body)."""
        import json

        boundary = "snnetbench"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        for one in [png] if isinstance(png, bytes) else png:
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n'
                f"Content-Type: image/png\r\n\r\n".encode()
                + one
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        r = self._send(
            "POST",
            f"/classify?{query}" if query else "/classify",
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        self.worker = r.getheader("x-snnet-worker")  # a front's pid (SNNET_API_WORKERS > 1)
        return r.status, json.loads(r.read())

    def get(self, path: str) -> dict:
        import json

        return json.loads(self._send("GET", path).read())

    def _send(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """One request's response, on a new connection if the server had closed the idle one
        (``SNNET_KEEP_ALIVE_S``: a client pausing longer finds it closed, as a browser would,
        and opens another)."""
        try:
            self.conn.request(method, path, body, headers or {})
            return self.conn.getresponse()
        except ConnectionError:  # (a broken pipe, a reset, RemoteDisconnected: nothing read)
            self.conn.close()
            self.conn.request(method, path, body, headers or {})
            return self.conn.getresponse()

    def close(self) -> None:
        self.conn.close()


def open_loop(
    url: str, jobs: list[tuple], handle: Callable[[Client, tuple], None], workers: int, start: float
) -> None:
    """Send on a schedule, whether or not earlier requests were answered (as independent users
    do): each job (a tuple whose first item is its time in s after ``start``, monotonic) is
    handed at its instant to one of ``workers`` threads, each with its own keep-alive Client,
    which calls ``handle(client, job)``. Returns when every job is handled."""
    todo: queue.Queue = queue.Queue()

    def worker() -> None:
        c = Client(url)
        while (job := todo.get()) is not None:
            handle(c, job)
        c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for th in threads:
        th.start()
    for job in jobs:
        delay = start + job[0] - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the schedule's instant
        todo.put(job)
    for _ in threads:
        todo.put(None)
    for th in threads:
        th.join()
