"""A request that finds the model idle goes to the model process from the event loop, which also
reads its answer (``Scheduler.submit``): no hand-off to the worker thread and back. A real child
process on the tiny family, shared: the tests that kill or stop it leave its runner with a new
one (started by the next request), as the server's runner is left."""

import asyncio
import os
import signal
import sys
import time

import pytest
import torch

from server.errors import ComputeError
from server.latency import LatencyModel
from server.metrics import Metrics
from server.runner import ProcessRunner
from server.scheduler import Scheduler
from tests._planning import N, profile
from tests.conftest import build_tiny

pytestmark = pytest.mark.timing  # `make test` runs it alone (pyproject's markers)


@pytest.fixture(scope="module")
def child():
    """(a ProcessRunner, its net), shared; a test that kills its process leaves the runner to
    start a new one (a model process starts in about 5 s here: a dozen of them were a minute of
    the suite)."""
    net = build_tiny().eval()
    runner = ProcessRunner(net, torch.float32, threads=1)
    yield runner, net
    runner.close()


def scheduler(runner) -> Scheduler:
    sched = Scheduler(
        LatencyModel(profile()), runner, stitches=N, max_batch=4, max_wait_ms=0, max_queue=64,
        metrics=Metrics(),
    )  # fmt: skip
    sched.start()
    return sched


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Runs a scenario on asyncio's own loop and on uvloop's (the server's: it makes a watched
    socket non-blocking, which the worker's blocking reads must not inherit)."""
    if request.param == "uvloop":
        import uvloop

        return uvloop.run
    return asyncio.run


@pytest.fixture
def served(child):
    """(a started scheduler over the shared child, the net); stopped after."""
    sched = scheduler(child[0])
    yield sched, child[1]
    sched.stop()


def expected(net, x, stitch):
    with torch.no_grad():
        return net(x, stitch)


def test_an_idle_models_request_goes_from_the_event_loop_and_answers_as_the_worker_would(
    served, digits, run
):
    sched, net = served
    x = digits[0][:3]

    async def sequential():
        out = []
        for stitch in (0, 5, 22):
            now = time.monotonic()
            out.append(await sched.submit(x, stitch, now + 60, now))
            # idle again when the answer arrives: a sequential client's next one goes direct too
            assert not sched.view(time.monotonic() + 60, time.monotonic()).busy
        return out

    results = run(sequential())
    assert sched.direct_batches == 3
    for r, stitch in zip(results, (0, 5, 22), strict=True):
        assert r.stitch == stitch and r.batch_size == 3 and r.compute_ms > 0
        torch.testing.assert_close(r.logits, expected(net, x, stitch), rtol=1e-5, atol=1e-5)
    reg = sched.metrics.registry
    assert reg.get_sample_value("snnet_batch_size_sum") == 9  # counted as the worker counts
    assert reg.get_sample_value("snnet_compute_profiled_seconds_total", {"stitch": "5"}) > 0


def test_requests_arriving_while_it_runs_queue_for_the_worker_in_deadline_order(
    served, digits, run
):
    sched, net = served
    x = digits[0][:1]

    async def burst():
        now = time.monotonic()
        first = sched.submit(x, 7, now + 60, now)  # idle: sent at once, from here
        assert sched.view(now + 60, now).busy
        # queued: the model is busy until the event loop reads the first answer
        later = [sched.submit(digits[0][i : i + 1], 7, now + 60 - i, now) for i in (1, 2, 3)]
        assert sched.queued_images == 3
        return await first, await asyncio.gather(*later)

    first, later = run(burst())
    assert sched.direct_batches == 1
    torch.testing.assert_close(first.logits, expected(net, x, 7), rtol=1e-5, atol=1e-5)
    want = expected(net, digits[0][1:4], 7)
    for i, r in enumerate(later):
        torch.testing.assert_close(r.logits[0], want[i], rtol=1e-5, atol=1e-5)
    assert [r.batch_size for r in later] == [3, 3, 3]  # the worker batched the three waiting


def test_a_batch_the_event_loop_cannot_send_fails_alone_and_leaves_the_model_free(
    served, digits, run
):
    """A batch the hop cannot carry (more than 6 dimensions) raises from ``submit`` before a
    byte is sent; the model is not left marked busy, so the next request goes direct."""
    sched, net = served
    x = digits[0][:2]

    async def bad_then_good():
        now = time.monotonic()
        with pytest.raises(ValueError, match="at most 6 dimensions"):
            sched.submit(x.reshape(2, 1, 1, 1, 1, 28, 28), 3, now + 60, now)
        assert not sched.view(now + 60, now).busy
        return await sched.submit(x, 3, now + 60, now)

    result = run(bad_then_good())
    assert sched.direct_batches == 1
    torch.testing.assert_close(result.logits, expected(net, x, 3), rtol=1e-5, atol=1e-5)


def test_stop_waits_for_a_batch_sent_from_the_event_loop(served, digits, run):
    sched, _ = served

    async def stop_while_running():
        now = time.monotonic()
        fut = sched.submit(digits[0][:4], 22, now + 60, now)
        assert sched.direct_batches == 1
        await asyncio.to_thread(sched.stop)  # as the engine stops it: off the loop
        return fut.done(), await fut

    done, result = run(stop_while_running())
    assert done and result.logits.shape == (4, 10)


def test_a_model_process_dying_fails_only_its_batch_and_the_next_request_gets_a_new_one(
    child, digits, run
):
    runner, net = child
    sched = scheduler(runner)
    x = digits[0][:2]

    async def kill_then_retry():
        now = time.monotonic()
        os.kill(sched.runner.pid, signal.SIGKILL)
        with pytest.raises(ComputeError, match="model process died"):
            await sched.submit(x, 3, now + 60, now)  # sent, or found dead: fails either way
        now = time.monotonic()
        return await sched.submit(x, 3, now + 60, now)  # the worker starts a new process

    try:
        result = run(kill_then_retry())
    finally:
        sched.stop()
    torch.testing.assert_close(result.logits, expected(net, x, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_model_process_slow_to_exit_does_not_stall_the_event_loop(
    child, digits, run, monkeypatch
):
    """The event loop reads the answer of a batch it sent; when the socket ends but the process
    has not exited (here: stopped), the request fails at once and a thread kills the process,
    instead of the loop waiting up to 10 s for it with every other request."""
    import socket

    import server.runner

    monkeypatch.setattr(server.runner, "EXIT_WAIT_S", 2.0)  # the wait before the kill

    runner, net = child
    x = digits[0][:2]
    runner(x, 3)  # a process running (a test before may have left it to the next request)
    sched = scheduler(runner)
    proc = runner._proc

    async def end_socket_of_stopped_child():
        os.kill(proc.pid, signal.SIGSTOP)
        now = time.monotonic()
        pending = sched.submit(x, 3, now + 60, now)
        runner._sock.shutdown(socket.SHUT_RD)  # the socket ends; the process does not exit
        t0 = time.monotonic()
        with pytest.raises(ComputeError, match="model process died"):
            await pending
        assert time.monotonic() - t0 < 1.5  # not the 2 s wait for the process, then the kill
        with open(f"/proc/{proc.pid}/stat") as f:  # the loop did not wait for it: still stopped
            return f.read().split(") ")[1][0]

    try:
        state = run(end_socket_of_stopped_child())
        assert state == "T"
        runner.reaping.join(30)
        assert proc.exitcode == -signal.SIGKILL
    finally:
        sched.stop()
