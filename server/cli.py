"""The ``snnet`` console script: model commands from ``snnet_core.cli`` plus ``serve``.

Light to import (no torch at module level): ``snnet serve`` starts the model process before
anything heavy is imported, so that its imports and this process's run side by side
(``server.early``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Settings


def serve_settings(args: argparse.Namespace) -> Settings | None:
    """The Settings ``serve`` runs with (environment, then its options), or None after saying on
    stderr what is wrong. Light: pydantic only, no torch."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from .config import Settings

    given = (
        ("host", args.host), ("port", args.port), ("grpc_port", args.grpc_port),
        ("model_name", args.model_name), ("weights", args.weights),
    )  # fmt: skip
    overrides = {k: v for k, v in given if v is not None}
    try:
        settings = Settings(**overrides)
        # As the environment they override, for every process this one starts: the API workers'
        # fronts read their settings from it (`--weights` served one model from the owner and
        # the bundled one's labels and preprocessing from the fronts).
        for name, value in overrides.items():
            os.environ[f"SNNET_{name.upper()}"] = str(value)
        return settings
    except SettingsError as e:  # e.g. a list setting that is not JSON
        print(f"error: invalid settings: {e}", file=sys.stderr)
    except ValidationError as e:
        said: dict[str, list[str]] = {}  # a setting of several types has an error for each
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if not err["loc"]:  # settings that do not go together: the message names them
                lines.append(f"  {msg}")
                continue
            name = str(err["loc"][0])
            said.setdefault(name, [f"got {err['input']!r}"]).append(msg)
        lines[:0] = [
            f"  {'--' + name.replace('_', '-') + ' / ' if name in overrides else ''}"
            f"SNNET_{name.upper()}: {msgs[0]}; {', or '.join(msgs[1:])}"
            for name, msgs in said.items()
        ]
        if (
            "port" in said
            and "port" not in overrides
            and os.environ.get("SNNET_PORT", "")[:6] == "tcp://"
        ):
            lines.append(
                "  (SNNET_PORT=tcp://... is what Kubernetes puts in a pod's environment for a "
                "Service named snnet; set enableServiceLinks: false in the pod spec, as "
                "deploy/k8s does, or give SNNET_PORT in its env)"
            )
        print("error: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from snnet_core import CheckpointError, resolve_device, resolve_dtype, verify

    from . import early
    from .app import create_app
    from .config import BUNDLED_WEIGHTS

    settings = serve_settings(args)
    if settings is None:
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _warn_unknown_settings()
    if said := _ports_unusable(settings) or _threads_unusable(settings):
        # Checked first, before loading: with SO_REUSEPORT (gRPC's default, and the HTTP port's
        # with SNNET_API_WORKERS > 1) a second server joined a port another held, and the
        # kernel spread calls over both, two models answering by turns.
        early.discard()
        print(f"error: cannot serve: {said}", file=sys.stderr)
        return 2
    try:
        # A missing or corrupt checkpoint, or a device that is not there, is a start-up error,
        # reported before the port is bound.
        verify(settings.weights)
        device = resolve_device(settings.device)
        if settings.dtype != "auto":
            resolve_dtype(settings.dtype, device)
    except (CheckpointError, ValueError, RuntimeError) as e:
        early.discard()
        hint = ""
        unset = "SNNET_WEIGHTS" not in os.environ
        if unset and settings.weights == BUNDLED_WEIGHTS and not BUNDLED_WEIGHTS.is_dir():
            # installed without the checkout (pip install .): the bundled weights stay there
            hint = (
                "; SNNET_WEIGHTS is unset, and the bundled weights are the weights/ folder of a "
                "source checkout: set SNNET_WEIGHTS to a checkpoint directory (one that "
                "`snnet train` or `snnet import` wrote, or that weights/ folder)"
            )
        print(f"error: cannot serve: {e}{hint}", file=sys.stderr)
        return 2
    workers = api_workers(settings, device)
    code = 0
    if workers == 1:
        app = create_app(settings)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=settings.host, port=settings.port, **settings.uvicorn_options()
            )
        )
        app.state.lifecycle.on_failure = lambda: setattr(server, "should_exit", True)
        run = lambda: _run_as_uvicorn_does(server)  # noqa: E731
    else:
        app, run = _owner_of_fronts(settings, workers)
    try:
        run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down
        code = 130
    lifecycle = app.state.lifecycle
    if lifecycle.failed:
        # Start-up failed and stopped the server: say so last, where a supervisor's log ends,
        # and exit non-zero (the traceback above is for a bug report).
        print(f"error: cannot serve: start-up failed: {lifecycle.failed}", file=sys.stderr)
        code = 1
    if lifecycle.engine is not None:
        # A second Ctrl-C makes uvicorn exit without the lifespan's drain: the model process
        # (which ignores signals: only this one ends it) then kept the interpreter's exit
        # waiting on it for ever. Closing it again after a drain does nothing.
        lifecycle.engine.runner.close()
    if lifecycle.cancel.is_set() and lifecycle.engine is None:
        # Ctrl-C during start-up: uvicorn re-raises it only if the event loop's task is still
        # running when it does, so it came back as a normal return and the exit code was 0; a
        # supervisor read a cancelled start as a clean one. (SIGTERM is re-raised and ends the
        # process by its default action.)
        code = 130
    if not lifecycle.started.is_set():
        # Stopped during start-up: its thread ends within one forward, but finalising the
        # interpreter under a thread inside torch aborts the process. Nothing is left to save.
        logging.getLogger("snnet.server").info("exiting before start-up finished")
        logging.shutdown()
        os._exit(code)
    return code


def _run_as_uvicorn_does(server) -> None:
    """``server.run()`` ended as ``uvicorn.run`` ends it: Ctrl-C quietly, a server that never
    started with uvicorn's exit code 3."""
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        sys.exit(3)


def _ports_unusable(settings) -> str | None:
    """What stops this server from binding its HTTP or gRPC port, with what to change; None if
    nothing does."""
    import errno

    for port, what, setting, off in (
        (settings.port, "HTTP", "SNNET_PORT or --port", ""),
        (settings.grpc_port, "gRPC", "SNNET_GRPC_PORT or --grpc-port", " (0: no gRPC)"),
    ):
        failed = _bind_error(settings.host, port) if port else None
        if failed is None:
            continue
        where = f"[{settings.host}]:{port}" if ":" in settings.host else f"{settings.host}:{port}"
        fix = {
            errno.EADDRINUSE: f"another process listens there; set {setting} to a free port{off}",
            errno.EACCES: f"a port below 1024 needs privileges; set {setting} to 1024 or above{off}",
            errno.EADDRNOTAVAIL: "SNNET_HOST is not an address of this machine",
        }.get(failed.errno, f"set {setting}{off} or SNNET_HOST")
        return f"the {what} port {where} cannot be bound ({failed.strerror}): {fix}"
    return None


def _threads_unusable(settings) -> str | None:
    """What is wrong with an SNNET_THREADS larger than the CPUs this process may use, or None.
    (64 on 2 CPUs was taken: its stitch 0 ran 20x slower than on 1 thread; 9999 stalled.)"""
    from .environ import cores, quota_note

    n = cores()
    if settings.threads == "auto" or settings.threads <= n:
        return None
    return (
        f"SNNET_THREADS={settings.threads} is more than the {n} CPU{'s' if n > 1 else ''} this "
        f"process may use{quota_note()}: the model's threads would take turns on them; "
        f"allowed: auto or 1..{n}"
    )


def _bind_error(host: str, port: int) -> OSError | None:
    """Why ``host:port`` cannot be bound by this process alone, on any address ``host`` resolves
    to (None if it can): a plain bind, without SO_REUSEPORT, fails while any other socket
    listens there. IPv6 addresses are bound IPv6-only, as uvicorn binds them. A host that does
    not resolve is an error (EADDRNOTAVAIL: it is no address of this machine); a socket family
    this machine lacks is left to the server's own bind."""
    import errno
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:  # (it failed later, in a traceback naming gRPC)
        why = getattr(e, "strerror", None) or str(e) or "does not resolve"
        return OSError(errno.EADDRNOTAVAIL, f"{host!r}: {why}")
    for family, kind, proto, addr in {(f, k, p, a) for f, k, p, _, a in found}:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is free)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
        except OSError as e:
            if e.errno is not None and e.strerror:
                return e
            return None
    return None


def _warn_unknown_settings() -> None:
    """A misspelt setting (``SNNET_MAX_BATCH=4``) was ignored without a word."""
    import difflib

    from .config import Settings

    known = [f"SNNET_{name.upper()}" for name in Settings.model_fields]
    for name in sorted(os.environ):
        if name.startswith("SNNET_") and not name.startswith("SNNET_TEST_") and name not in known:
            # (a name cut short first: SNNET_SLO read as "did you mean SNNET_PORT?")
            close = [k for k in known if k.startswith(f"{name}_")][:1] or (
                difflib.get_close_matches(name, known, n=1)
            )
            logging.getLogger("snnet.server").warning(
                "%s is not a setting of snnet serve and is ignored%s (the README's "
                "configuration table lists them)",
                name, f"; did you mean {close[0]}?" if close else "",
            )  # fmt: skip


def api_workers(settings, device) -> int:
    """``SNNET_API_WORKERS``, with auto resolved: 1 on CPU, half the cores (at most 8) on CUDA."""
    if settings.api_workers != "auto":
        return settings.api_workers
    if device.type != "cuda":
        return 1
    from .environ import cores

    return max(1, min(8, cores() // 2))


def _owner_of_fronts(settings, workers: int):
    """The owner's app and how to run it: its HTTP on the shared port and on a private Unix
    socket (the fronts pass it every route but /classify), the fronts' channel, the fronts."""
    import shutil
    import signal
    import socket
    import tempfile

    import uvicorn

    from .app import create_app
    from .fronts import Fronts, listen_socket

    tcp = listen_socket(settings.host, settings.port)
    private = tempfile.mkdtemp(prefix="snnet-")
    http_path, channel_path = f"{private}/http.sock", f"{private}/channel.sock"
    uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    uds.bind(http_path)
    uds.listen(2048)
    fronts = Fronts(workers - 1, settings.host, tcp.getsockname()[1], channel_path, http_path)
    app = create_app(settings, fronts=fronts)
    config = uvicorn.Config(app, **settings.uvicorn_options())
    logging.getLogger("snnet.server").info(
        "%d API workers on port %d: this process (the model owner) and %d front%s; their "
        "channel %s", workers, tcp.getsockname()[1], workers - 1, "s" if workers > 2 else "",
        channel_path,
    )  # fmt: skip

    def run() -> None:
        # uvicorn re-raises a SIGTERM once it has drained, under the handler it found: the
        # default one ended the process before the finally below, and the directory of the two
        # Unix sockets stayed in /tmp after every stop. Take it here; re-raise it after.
        server, term = uvicorn.Server(config), []
        app.state.lifecycle.on_failure = lambda: setattr(server, "should_exit", True)

        def stop(sig, frame) -> None:  # (uvicorn's own handler replaces this while it serves)
            term.append(sig)
            server.should_exit = True

        default = signal.signal(signal.SIGTERM, stop)
        try:
            server.run(sockets=[tcp, uds])
        finally:
            shutil.rmtree(private, ignore_errors=True)  # the two Unix sockets
            signal.signal(signal.SIGTERM, default)
            if term:
                signal.raise_signal(signal.SIGTERM)

    return app, run


def build_parser() -> argparse.ArgumentParser:
    from snnet_core.cli import add_commands

    parser = argparse.ArgumentParser(
        prog="snnet", description="Stitchable Neural Networks: build, profile, serve"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)
    add_serve_options(
        sub.add_parser(
            "serve",
            help="serve a checkpoint over HTTP",
            description="Serve a checkpoint over HTTP (and the Open Inference Protocol over "
            "gRPC). Settings come from SNNET_* environment variables: SNNET_WEIGHTS is the "
            "checkpoint directory (default: the bundled weights/); the README's configuration "
            "table lists the others.",
        )
    )
    return parser


def add_serve_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--host", help="interface (overrides SNNET_HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (overrides SNNET_PORT; default 8000)")
    p.add_argument(
        "--grpc-port", type=int,
        help="the V2 gRPC port (overrides SNNET_GRPC_PORT; default 8081; 0: no gRPC)",
    )  # fmt: skip
    p.add_argument(
        "--weights", help="checkpoint directory (overrides SNNET_WEIGHTS; default: the bundled one)"
    )
    p.add_argument(
        "--model-name",
        help="the model's name in the Open Inference Protocol (overrides SNNET_MODEL_NAME; "
        "default: the checkpoint directory's name)",
    )
    p.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        if args[:1] == ["serve"] and not {"-h", "--help"} & set(args):
            # Settings first, before torch is imported: a wrong one is said at once (it took
            # the 5-8 s of the imports here), and the model process starts early with them.
            serve = add_serve_options(argparse.ArgumentParser(prog="snnet serve"))
            settings = serve_settings(serve.parse_args(args[1:]))
            if settings is None:
                return 2
            _start_model_process_early(settings)
        from snnet_core.cli import run

        return run(build_parser(), argv)
    except KeyboardInterrupt:  # Ctrl-C before uvicorn handles it: during the imports, say
        print("interrupted", file=sys.stderr)
        return 130


def _start_model_process_early(s: Settings) -> None:
    """Spawn the model process before this one imports torch (``server.early``)."""
    try:
        from . import early

        early.start(s.weights, s.threads, s.device, s.worker, s.profile_cache)
    except Exception:  # the process starts later, as without this
        return


if __name__ == "__main__":
    sys.exit(main())
