"""The model process, started first: its imports overlap the server's own.

A model process (``server.runner``) spends seconds importing torch and timm before it can take
the weights: 5.1 s of a 12 s start of the bundled model here, after the server process had
spent about as long on the same imports and on loading the weights. ``snnet serve`` therefore
spawns it before importing anything heavy (``start``); when the weights are loaded,
``ProcessRunner`` hands them to it (``take``) instead of spawning one then. Every model process
starts the same way (``spawn``: a socket, nothing else) and receives its weights over that
socket, so a restarted one follows the same path as an early one.

The process's OpenMP settings are fixed before it imports torch (libgomp reads them when it
loads) and depend on the model's thread count (``server.environ.model_child_env``), which
``SNNET_THREADS=auto`` measures only once the weights are loaded. The early process starts with
the settings ``SNNET_THREADS`` implies or, for auto, those of the last choice made for these
weights on this machine (remembered in ``threads.json``: beside ``SNNET_PROFILE_CACHE`` when
that is set, else in the user's cache directory). When
the start-up's own choice differs, the early process is stopped and another started, as
without an early start. Nothing here imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
from pathlib import Path

from .environ import cores, model_child_env, spawning_with

log = logging.getLogger("snnet.early")

_lock = threading.Lock()
# (process, socket, its OpenMP settings, whether it said it has imported torch)
_early: tuple[mp.process.BaseProcess, socket.socket, dict[str, str], bool] | None = None
_registered = False  # discard() runs at exit
REMEMBERED = 64  # weights directories kept in threads.json
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _host(sock: socket.socket, parent: int) -> None:
    """The model process's entry: only the parent ends it (it drains what it accepted first,
    and needs this process for that); then the heavy imports, then wait for the weights."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(True)
    if os.getppid() != parent:  # gone before that
        os._exit(0)
    from .runner import serve_from_socket

    _die_with_parent(False)  # (a later spawner may be a thread that ends first)
    serve_from_socket(sock)


def _die_with_parent(on: bool) -> None:
    """While on, the kernel kills this process when the thread that spawned it ends (Linux
    ``PR_SET_PDEATHSIG``). For the imports only: they take seconds with nothing reading the
    socket, and mostly hold the GIL (loading torch's libraries), so no thread of this process
    could look for the parent. A server killed by SIGTERM in its first second died at once,
    but its model process, which ignores SIGTERM, ran on through its imports (6.1 s). After
    them, the socket's end of file says the parent is gone."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such call
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL if on else 0)


def spawn(env: dict[str, str]) -> tuple[mp.process.BaseProcess, socket.socket]:
    """Start a model process with ``env`` added to its environment; it waits on the returned
    socket for its weights (``server.runner``)."""
    parent, child = socket.socketpair()
    proc = mp.get_context("spawn").Process(
        target=_host, args=(child, os.getpid()), name="snnet-model", daemon=True
    )
    try:
        try:
            with spawning_with(env), _signals_held():
                proc.start()
        finally:
            child.close()
    except BaseException:
        parent.close()
        raise
    return proc, parent


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM held (blocked) in this thread while a model process is spawned, and
    from birth in the process, which inherits the mask: a Ctrl-C in that moment would otherwise
    stop this process halfway through sending the child its start-up data, and the child print
    a traceback. The child never takes them (``_host`` ignores them); here a pending one is
    raised as soon as the spawn is done."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    # The spawn starts multiprocessing's resource tracker first if it is not running, and
    # unblocks both signals after that (not restores: bpo-33613's mask): start it before.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start(
    weights: Path, threads: int | str, device: str, worker: str, profile_cache: Path | None = None
) -> bool:
    """Spawn the model process now, if serving these settings will use one (a CPU model; with
    ``device`` auto, when no GPU driver is visible); whether it did. Never raises: a failure
    here only means the process starts later, as without this. One started before and not
    taken is stopped."""
    global _early, _registered
    discard()
    if worker == "thread" or device.startswith("cuda"):
        return False
    if device == "auto" and worker == "auto" and _gpu_driver():
        return False  # most likely CUDA: a thread worker, no process
    guess = threads if isinstance(threads, int) else remembered_threads(weights, profile_cache)
    env = model_child_env(guess)
    try:
        proc, sock = spawn(env)
    except Exception as e:
        log.debug("no early model process: %s", e)
        return False
    with _lock:
        previous, _early = _early, (proc, sock, env, False)
    if previous is not None:  # (another thread's, meanwhile)
        stop(*previous[:2])
    # Before multiprocessing's own exit handler (registered earlier, so run later), which joins
    # every child without a timeout: this one ignores SIGTERM and would wait for its socket.
    if not _registered:
        atexit.register(discard)
        _registered = True
    return True


def take(env: dict[str, str]) -> tuple[mp.process.BaseProcess, socket.socket, bool] | None:
    """The early model process (process, socket, whether it said it has imported torch), if it
    was started with ``env`` and is still running; else None, and it is stopped."""
    global _early
    with _lock:
        early, _early = _early, None
    if early is None:
        return None
    proc, sock, had, done = early
    if not proc.is_alive():
        log.warning("the model process started early exited (code %s); starting another",
                    proc.exitcode)  # fmt: skip
    elif had != env:
        log.info(
            "the model process started early has other OpenMP settings (%s, not %s): starting "
            "another", _show(had), _show(env),
        )  # fmt: skip
    else:
        return proc, sock, done
    stop(proc, sock)
    return None


def held() -> tuple[mp.process.BaseProcess, socket.socket] | None:
    """The early model process and its socket, left in place (for ``server.runner.settle_early``
    to wait for its imports); None if there is none or it already said so."""
    with _lock:
        return None if _early is None or _early[3] else _early[:2]


def imported() -> None:
    """Note that the early model process said it has imported torch (its message was read)."""
    global _early
    with _lock:
        if _early is not None:
            _early = (*_early[:3], True)


def discard() -> None:
    """Stop the early model process if nothing took it (start-up failed, or a thread worker)."""
    global _early
    with _lock:
        early, _early = _early, None
    if early is not None:
        stop(*early[:2])


def stop(proc: mp.process.BaseProcess, sock: socket.socket) -> None:
    """End a model process that has no model to keep serving (not started, or failed to)."""
    sock.close()  # it returns when it reads the end of its socket, once its imports are done
    proc.kill()  # (they take seconds: not worth waiting for; no-op if it has exited)
    proc.join(5)


def _show(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(env.items()))


def _gpu_driver() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))  # dxg: WSL2


# -- the last thread count chosen, per weights directory and core count ------------------------


def _threads_file(profile_cache: Path | None) -> Path:
    """Beside ``SNNET_PROFILE_CACHE`` when it is set (the place kept for start-up measurements:
    the image's volume, where a container user has no home), else in the user's cache."""
    if profile_cache is not None:
        return Path(profile_cache).parent / "threads.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"  # (RuntimeError: no home)
    return Path(base) / "snnet" / "threads.json"


def _key(weights: Path) -> str:
    return f"{Path(weights).resolve()} on {cores()} cores"


def remembered_threads(weights: Path, profile_cache: Path | None = None) -> int | None:
    """The thread count ``SNNET_THREADS=auto`` chose last for ``weights`` on this many cores
    (None: never, or the file cannot be read), with this ``SNNET_PROFILE_CACHE``."""
    try:
        value = json.loads(_threads_file(profile_cache).read_text()).get(_key(weights))
    except Exception:  # no file, not JSON, not a dict, no home directory: no guess
        return None
    return value if isinstance(value, int) and value >= 1 else None


def remember_threads(weights: Path, threads: int, profile_cache: Path | None = None) -> None:
    """Keep the thread count chosen for ``weights`` (the last ``REMEMBERED`` directories)."""
    with contextlib.suppress(Exception):  # a guess for the next start: never worth failing this one
        path = _threads_file(profile_cache)
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        key = _key(weights)
        if known.get(key) == threads:
            return
        known.pop(key, None)
        known[key] = threads
        known = dict(list(known.items())[-REMEMBERED:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
