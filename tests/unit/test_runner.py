"""The model runners: the child process gives the in-thread answers, survives its own death.

Each test that kills or signals a child gets a child of its own, so no test depends on another
having run before it (or not)."""

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from server import early
from server.cpuwait import RunDelay
from server.environ import (
    CHILD_ENV,
    PIN_ENV,
    USER_BINDING,
    cpus,
    model_child_env,
    spawning_with,
)
from server.runner import (
    FD_HEADROOM,
    InlineRunner,
    ProcessRunner,
    RunnerError,
    ensure_descriptors,
    settle_early,
)
from tests._busy import busy_loop_on


@pytest.fixture(autouse=True)
def _no_early_process_left():
    """A test that fails between starting a model process early and a runner taking it must not
    leave it for the next test's runner."""
    yield
    early.discard()


@pytest.fixture(scope="module")
def net():
    from tests.conftest import build_tiny

    return build_tiny().eval()


@pytest.fixture(scope="module")
def runners(net):
    """Shared by the tests that leave the child as they found it."""
    inline = InlineRunner(net, torch.device("cpu"), torch.float32)
    proc = ProcessRunner(net, torch.float32, threads=1)
    yield inline, proc
    proc.close()


@pytest.fixture
def own_child(net):
    """A child for one test that kills or signals it."""
    proc = ProcessRunner(net, torch.float32, threads=1)
    yield InlineRunner(net, torch.device("cpu"), torch.float32), proc
    proc.close()


def test_the_process_runner_answers_like_the_model_in_this_process(runners, digits):
    """Up to its max_batch (8) a batch crosses by shared memory, beyond it as bytes through the
    socket: the same answers either way, and a smaller batch after a larger one reads only its
    own rows."""
    inline, proc = runners
    for n in (8, 12, 3):
        x = digits[0][:n]
        assert proc.shares(x) == (n <= 8)
        for stitch in (0, 5, 22):
            expected = inline(x, stitch)
            got = proc(x, stitch)
            assert got.dtype == torch.float32 and got.shape == (n, 10)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_each_runner_says_what_the_forward_took_apart_from_the_hop(runners, digits):
    """The calibration tells the device's speed from the hop to the model process by it."""
    x = digits[0][:8]
    for runner in runners:
        t0 = time.perf_counter()
        runner(x, 22)
        call_ms = (time.perf_counter() - t0) * 1e3
        assert 0.0 < runner.last_forward_ms <= call_ms


def test_the_child_shares_the_weights_instead_of_copying_them(runners):
    inline, proc = runners
    assert all(p.is_shared() for p in inline.net.parameters())


def test_a_model_error_is_reported_and_the_child_goes_on(runners, digits):
    _, proc = runners
    for n in (2, 12):  # the batch by shared memory, then as bytes after the message
        with pytest.raises(RunnerError, match="ValueError: unknown stitch id 999"):
            proc(digits[0][:n], 999)  # no such stitch
        assert proc(digits[0][:n], 1).shape == (n, 10)


def test_a_killed_child_fails_its_batch_and_is_replaced(own_child, digits):
    inline, proc = own_child
    old = proc.pid
    os.kill(old, signal.SIGKILL)
    with pytest.raises(RunnerError, match="died"):
        proc(digits[0][:4], 3)
    assert proc.pid != old and proc.restarts == 1
    torch.testing.assert_close(proc(digits[0][:4], 3), inline(digits[0][:4], 3))


def test_ctrl_c_to_the_process_group_leaves_the_child_serving_until_closed(own_child, digits):
    """The parent drains accepted requests on Ctrl-C and still needs the model for that; then
    closing the runner ends the child by itself (exit code 0, not killed after 5 s)."""
    _, proc = own_child
    pid, restarts, child = proc.pid, proc.restarts, proc._proc
    os.kill(pid, signal.SIGINT)
    assert proc(digits[0][:2], 0).shape == (2, 10)
    assert (proc.pid, proc.restarts) == (pid, restarts)
    proc.close()
    assert child.exitcode == 0 and not proc.ready


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or cpus() < 2, reason="needs Linux and 2 cores"
)
def test_a_model_process_taking_every_cpu_gets_the_openmp_spin_and_one_bound_cpu_per_thread(
    net, monkeypatch
):
    """Bound, a preempted OpenMP thread cannot be moved onto its team mate's CPU (the idle
    DeiT net's stalls, ``bench/pinning.py``). The settings are in the child's environment
    only: libgomp reads them when torch loads there."""
    for k in ("GOMP_SPINCOUNT", *USER_BINDING):
        monkeypatch.delenv(k, raising=False)
    proc = ProcessRunner(net, torch.float32, threads=cpus())
    try:  # the child's main thread runs the forward: OpenMP binds it at start
        env = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert f"GOMP_SPINCOUNT={CHILD_ENV['GOMP_SPINCOUNT']}".encode() in env
        assert CHILD_ENV["GOMP_SPINCOUNT"] == "20000"  # see server/environ.py for the A/B
        assert b"OMP_PROC_BIND=true" in env
        mask = os.sched_getaffinity(proc.pid)
        assert proc.bound and len(mask) == 1 and mask <= os.sched_getaffinity(0)
    finally:
        proc.close()
    assert "GOMP_SPINCOUNT" not in os.environ and "OMP_PROC_BIND" not in os.environ


def test_with_fewer_threads_than_cpus_or_the_users_own_openmp_settings_nothing_is_bound(
    monkeypatch,
):
    """With fewer threads than CPUs, replicas on one host would all bind to the same first
    CPUs, so the model's threads float; a binding or spin count the user set wins. (What the
    child gets is ``model_child_env``, put in place by ``spawning_with``: the test above shows
    a child started with it bound.)"""
    for k in ("GOMP_SPINCOUNT", *USER_BINDING):
        monkeypatch.delenv(k, raising=False)
    assert PIN_ENV.items() <= model_child_env(cpus()).items()
    assert not PIN_ENV.keys() & model_child_env(cpus() - 1).keys()
    monkeypatch.setenv("OMP_PROC_BIND", "false")
    assert not PIN_ENV.keys() & model_child_env(cpus()).keys()
    monkeypatch.setenv("GOMP_SPINCOUNT", "123")
    with spawning_with(model_child_env(1)):
        assert os.environ["GOMP_SPINCOUNT"] == "123" and os.environ["OMP_PROC_BIND"] == "false"
    assert os.environ["GOMP_SPINCOUNT"] == "123"


def test_the_warm_up_times_every_stitch_but_the_anchors_once_in_either_runner(runners, net):
    inline, proc = runners
    inline.warm_up([1, 4])
    stitched = {s.id for s in net.stitches if s.cut}
    for first_ms in (inline.first_ms, proc.first_ms):
        assert set(first_ms) == stitched  # the anchors ran first, untimed
        assert all(0 < ms < 10_000 for ms in first_ms.values())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux rlimits")
def test_a_low_open_file_limit_is_raised_for_the_shared_tensors_or_said_to_be_too_low(digits):
    """Each shared tensor is an open file (the tiny net's 182): with 40 free under the soft
    limit, sharing failed with "Too many open files". The runner raises the soft limit (up to
    the hard one), and says what to do when the hard limit leaves no room."""
    import resource

    from tests.conftest import build_tiny

    net = build_tiny().eval()  # not yet shared (the module's net is, by the first runner)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    tensors = sum(1 for _ in net.parameters()) + sum(1 for _ in net.buffers())
    # Files already open count too (in the whole suite this process had over 1000 open): the
    # soft limit would cover the tensors + FD_HEADROOM, but not on top of these.
    cap = hard if hard != resource.RLIM_INFINITY else 1 << 16
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    room = cap - len(os.listdir("/proc/self/fd")) - tensors - 500
    busy = [os.open(os.devnull, os.O_RDONLY) for _ in range(max(0, min(FD_HEADROOM + 300, room)))]
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 40, hard))
    try:
        proc = ProcessRunner(net, torch.float32, threads=1)
        try:
            assert proc(digits[0][:2], 0).shape == (2, 10)
        finally:
            proc.close()
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised >= tensors + FD_HEADROOM or raised == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in busy:
            os.close(fd)
    if hard != resource.RLIM_INFINITY:
        with pytest.raises(
            RunnerError, match=r"open files; this process may open at most .*ulimit -n"
        ):
            ensure_descriptors(hard)


def test_a_model_process_started_early_takes_the_weights_when_its_settings_match(
    net, digits, tmp_path
):
    """``snnet serve`` spawns the model process before it imports torch (``server.early``); the
    runner hands that process the weights over its socket instead of spawning one, and it
    answers as any other."""
    assert early.start(tmp_path, 1, "cpu", "auto")
    pid = early._early[0].pid
    settle_early()  # (start-up waits for its imports before measuring threads and dtype)
    assert early._early[3] and early.held() is None  # it said so, and is still there to take
    runner = ProcessRunner(net, torch.float32, threads=1)
    try:
        assert (runner.pid, runner.early) == (pid, True)
        x = digits[0][:4]
        expected = InlineRunner(net, torch.device("cpu"), torch.float32)(x, 5)
        torch.testing.assert_close(runner(x, 5), expected, rtol=1e-5, atol=1e-5)
    finally:
        runner.close()


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or cpus() < 2, reason="needs Linux and 2 cores"
)
def test_an_early_model_process_with_other_openmp_settings_or_dead_is_replaced(
    net, digits, tmp_path, monkeypatch
):
    """Its binding is fixed before torch loads; when the measured thread count wants another,
    or it died, the runner stops it and spawns one as without an early start."""
    for k in USER_BINDING:
        monkeypatch.delenv(k, raising=False)
    x = digits[0][:4]
    expected = InlineRunner(net, torch.device("cpu"), torch.float32)(x, 5)
    early.start(tmp_path, cpus(), "cpu", "auto")  # every CPU: bound
    bound = early._early[0]
    early.start(tmp_path, 1, "cpu", "auto")  # a newer early start replaces an older one
    assert bound.exitcode is not None
    dead = early._early[0]  # the settings the runner wants, but killed
    os.kill(dead.pid, signal.SIGKILL)
    dead.join(10)
    for wanted in (1, cpus()):  # the dead one, then one with other settings
        if wanted == cpus():
            early.start(tmp_path, 1, "cpu", "auto")  # unbound: the runner wants it bound
            other = early._early[0]
        runner = ProcessRunner(net, torch.float32, threads=wanted)
        try:
            assert runner.pid != dead.pid and not runner.early
            assert runner.bound == (wanted == cpus())
            torch.testing.assert_close(runner(x, 5), expected, rtol=1e-5, atol=1e-5)
        finally:
            runner.close()
    assert runner.pid != other.pid and other.exitcode is not None and early._early is None


def test_the_thread_count_chosen_is_remembered_for_the_next_early_start(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    assert early.remembered_threads(weights) is None
    early.remember_threads(weights, cpus())
    assert early.remembered_threads(weights) == cpus()
    assert early.remembered_threads(tmp_path / "other") is None
    assert early.start(weights, "auto", "cpu", "auto")
    # Started with the remembered count's binding (all cores: bound, where nothing is known:
    # not, unless there is only one core).
    assert early._early[2] == model_child_env(cpus())
    assert cpus() == 1 or model_child_env(cpus()) != model_child_env(None)
    early.discard()
    threads_file = tmp_path / "cache" / "snnet" / "threads.json"
    for broken in ("{not json", "null", "[1, 2]"):  # only a guess lost, never an error
        threads_file.write_text(broken)
        assert early.remembered_threads(weights) is None
        early.remember_threads(weights, 3)
        assert early.remembered_threads(weights) == 3
    # No model process for a GPU or a thread worker: nothing is started.
    assert not early.start(weights, 1, "cuda", "auto")
    assert not early.start(weights, 1, "cpu", "thread")
    assert early._early is None


def test_the_thread_count_is_remembered_beside_an_explicit_profile_cache(tmp_path, monkeypatch):
    """A container's user has no home; its image keeps SNNET_PROFILE_CACHE on a volume, and the
    thread count goes there too, so the next container's early start guesses right."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    weights, cache = tmp_path / "weights", tmp_path / "volume" / "profiles.json"
    early.remember_threads(weights, cpus(), cache)
    assert json.loads((tmp_path / "volume" / "threads.json").read_text())
    assert not (tmp_path / "home-cache").exists()
    assert early.remembered_threads(weights, cache) == cpus()
    assert early.remembered_threads(weights) is None  # the user's cache knows nothing of it
    assert early.start(weights, "auto", "cpu", "auto", cache)
    assert early._early[2] == model_child_env(cpus())


@pytest.mark.timing  # (a busy loop on a CPU: not beside the parallel suite)
@pytest.mark.skipif(not RunDelay.of_thread().available, reason="no /proc/<pid>/schedstat here")
def test_each_runner_says_how_long_its_forward_waited_for_a_cpu_taken_by_other_work(own_child):
    """A forward that shares its one CPU with a busy loop waits for it about half the time: the
    runner says so (``last_wait_ms``), and the server then takes its answer for a busy
    machine's, not an idle one's. The in-thread runner measures the calling thread."""
    inline, proc = own_child
    x = torch.zeros(256, *proc.net.input_size)  # about 15 ms of one thread here
    mine = os.sched_getaffinity(0)
    cpu = min(mine)
    threads = torch.get_num_threads()
    try:
        os.sched_setaffinity(proc.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # (this thread only: for the in-thread runner)
        torch.set_num_threads(1)
        with busy_loop_on(cpu):
            for runner in (proc, inline):
                waits = []
                for _ in range(3):
                    runner(x, 22)
                    waits.append(runner.last_wait_ms / runner.last_forward_ms)
                assert sorted(waits)[1] > 0.2, (runner.kind, waits)  # the median of 3
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, mine)


@pytest.mark.skipif(not RunDelay.of_thread().available, reason="no /proc/<pid>/schedstat here")
def test_a_forward_s_wait_is_the_mean_of_the_threads_that_ran_the_calling_one_always():
    """Over a forward of a few ms the kernel may not have brought the calling thread's own
    figures up to date (its run time moves at a tick or a switch): it counts whatever they say,
    as does any thread that got a CPU meanwhile; one that slept throughout (an idle pool's, a
    helper's) does not dilute the mean."""
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait)
    helper.start()
    try:
        waits = RunDelay.of_process()  # this thread, the helper, any others of the process
    finally:
        stop.set()
        helper.join()
    own, n = waits._own, len(waits._fds)
    assert own is not None and n >= 2
    before = [(1_000_000, 7)] * n  # (ns waited for a CPU, times it got one)
    after = list(before)
    after[own] = (3_000_000, 7)  # waited 2 ms, no new slice seen
    assert waits.waited_ms(before, after) == pytest.approx(2.0)
    other = (own + 1) % n  # got a CPU twice and waited 4 ms: the mean of the two
    after[other] = (5_000_000, 9)
    assert waits.waited_ms(before, after) == pytest.approx(3.0)
    after[own] = None  # a thread gone: not counted
    assert waits.waited_ms(before, after) == pytest.approx(4.0)
