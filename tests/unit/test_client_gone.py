"""``until_answered``: a request's wait for its Result against its HTTP client's connection, on
the real scheduler (the engine around it is only what the function reads)."""

import asyncio
import time
from types import SimpleNamespace

import pytest

from server.errors import Refusal
from server.planner import Plan
from server.routes.classify import CLIENT_GONE, until_answered
from tests._planning import make


def _plan(deadline: float) -> Plan:
    return Plan(0, 1e3, deadline, 0.0, 0.0, 0.0, 0.0, 10.0, 0.0)


def _setup():
    _, sched, _ = make(lambda s, b: 10.0, max_batch=1)
    unanswered: list[Plan] = []
    engine = SimpleNamespace(scheduler=sched, record_unanswered=unanswered.append)
    return sched, engine, unanswered


def test_a_client_gone_while_queued_withdraws_its_job_and_is_a_499(digits):
    sched, engine, unanswered = _setup()

    async def scenario():
        now = time.monotonic()
        pending = sched.submit(digits[0][:2], 3, now + 60, now)  # (not started: it waits)
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        waiting = asyncio.ensure_future(until_answered(receive, engine, _plan(now - 1), pending))
        await asyncio.sleep(0)
        assert not waiting.done()
        gone.set()
        with pytest.raises(Refusal) as e:
            await waiting
        return pending, e.value

    pending, refusal = asyncio.run(scenario())
    assert refusal.status == CLIENT_GONE and pending.cancelled()
    assert sched.queued_images == 0
    assert sched.metrics.registry.get_sample_value("snnet_withdrawn_images_total") == 2
    assert len(unanswered) == 1  # its deadline had passed: a missed budget


def test_a_request_cancelled_while_watched_withdraws_its_job(digits):
    """The server's grace period ran out (uvicorn cancels the request's task): nobody will read
    the answer, so its job leaves the queue, as an unwatched ``await`` of it did."""
    sched, engine, unanswered = _setup()

    async def scenario():
        now = time.monotonic()
        pending = sched.submit(digits[0][:2], 3, now + 60, now)

        async def receive():
            await asyncio.Event().wait()  # (the client stays)

        task = asyncio.ensure_future(until_answered(receive, engine, _plan(now + 60), pending))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # (the future's done-callback)
        return pending

    pending = asyncio.run(scenario())
    assert pending.cancelled() and sched.queued_images == 0 and not unanswered


def test_an_answer_before_any_disconnect_is_returned(digits):
    sched, engine, _ = _setup()

    async def scenario():
        now = time.monotonic()
        pending = sched.submit(digits[0][:2], 3, now + 60, now)

        async def receive():
            await asyncio.Event().wait()

        sched.start()
        await until_answered(receive, engine, _plan(now + 60), pending)
        return await pending  # (as the routes do: it returns at once if a batch has it)

    result = asyncio.run(scenario())
    sched.stop()
    assert result.stitch == 3
