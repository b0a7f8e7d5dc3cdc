"""The latency model, the scheduler's queues and worker, and the HTTP backlog estimate, on the tiny
real family with a known profile."""

import asyncio
import contextlib
import os
import time

import pytest
import torch

from server.cpuwait import CONTENDED_SHARE, RunDelay
from server.errors import Refusal
from server.ingress import Ingress
from server.latency import LatencyModel
from tests._busy import busy_loop_on
from tests._planning import NOW, make, profile


def test_prediction_interpolates_and_never_falls_with_batch():
    m = LatencyModel(profile(lambda s, b: {1: 2.0, 2: 3.0, 4: 1.0, 8: 9.0}[b]))  # bs 4 is noise
    assert m.predict_ms(0, 1) == 2.0 and m.predict_ms(0, 2) == 3.0
    assert m.predict_ms(0, 4) == 3.0  # raised to bs 2's
    assert m.predict_ms(0, 6) == pytest.approx(6.0)  # between 4 (3.0) and 8 (9.0)
    assert m.predict_ms(0, 16) == pytest.approx(21.0)  # extrapolated from 4 and 8
    m.set_correction(0, 2.0)
    assert m.predict_ms(0, 6) == pytest.approx(12.0) and m.base_ms(0, 6) == pytest.approx(6.0)


def test_the_queue_view_orders_by_deadline_and_protects_later_jobs():
    _, sched, net = make()
    x = torch.zeros(1, *net.input_size)

    async def scenario():
        sched.submit(x, 9, NOW + 0.040, NOW)  # 10 ms each
        sched.submit(x, 9, NOW + 0.020, NOW)
        sched.submit(x, 2, NOW + 0.100, NOW)  # 3 ms
        return sched.view(NOW + 0.030, NOW), sched.view(NOW + 1.0, NOW)

    early, late = asyncio.run(scenario())
    assert early.ahead_ms == pytest.approx(10.0) and early.counts == {9: 1} and early.busy
    # Due later: the stitch-9 job due at 40 ms ends at 20 ms (20 ms spare), stitch 2 at 23 ms.
    assert early.later_slack_ms == pytest.approx(20.0)
    assert late.ahead_ms == pytest.approx(23.0) and late.counts == {9: 2, 2: 1}
    assert late.later_slack_ms == float("inf")
    assert sched.queued_work_ms() == pytest.approx(23.0)


def test_a_full_queue_is_refused():
    _, sched, net = make(lambda s, b: 1.0, max_queue=2)
    x = torch.zeros(2, *net.input_size)

    async def scenario():
        sched.submit(x, 0, NOW + 1, NOW)
        with pytest.raises(Refusal, match="queue full") as e:
            sched.submit(x, 0, NOW + 1, NOW)
        return e.value

    err = asyncio.run(scenario())
    assert err.status == 503 and err.headers == {"Retry-After": "1"}


def test_worker_batches_requests_and_answers_each_correctly(digits):
    _, sched, net = make(lambda s, b: 1.0, max_batch=8)
    images = digits[0][:12]
    with torch.no_grad():
        expected = {s: net(images, s) for s in (2, 5)}

    async def scenario():
        now = time.monotonic()
        futs = [
            (i, s, sched.submit(images[i : i + 1], s, now + 60, now))
            for i in range(12)
            for s in (2, 5)
        ]
        sched.start()  # everything already queued: batches of up to 8 per stitch
        return [(i, s, await f) for i, s, f in futs]

    results = asyncio.run(scenario())
    sched.stop()
    for i, s, r in results:
        assert r.stitch == s
        torch.testing.assert_close(r.logits[0], expected[s][i], rtol=1e-4, atol=1e-5)
    assert max(r.batch_size for _, _, r in results) == 8


def test_stop_drains_everything_accepted(digits):
    _, sched, _ = make(lambda s, b: 1.0)

    async def scenario():
        now = time.monotonic()
        futs = [sched.submit(digits[0][:1], s % 5, now + 60, now) for s in range(10)]
        sched.start()
        await asyncio.to_thread(sched.stop)
        with pytest.raises(Refusal, match="shutting down"):
            sched.submit(digits[0][:1], 0, now + 60, now)
        return await asyncio.gather(*futs)

    results = asyncio.run(scenario())
    assert len(results) == 10 and all(r.logits.shape == (1, 10) for r in results)


def test_a_request_larger_than_max_batch_runs_in_max_batch_chunks(digits):
    _, sched, net = make(lambda s, b: 1.0 * b, max_batch=4)
    images = digits[0][:10]
    with torch.no_grad():
        expected = net(images, 3)

    async def scenario():
        fut = sched.submit(images, 3, time.monotonic() + 60, time.monotonic())
        sched.start()
        return await fut

    result = asyncio.run(scenario())
    sched.stop()
    torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-5)
    # As predicted: 4 + 4 + 2, never one batch of 10.
    assert sched.batches_ms(3, 10) == pytest.approx(10.0)
    reg = sched.metrics.registry
    assert reg.get_sample_value("snnet_batch_size_sum") == 10
    assert reg.get_sample_value("snnet_batch_size_bucket", {"le": "4.0"}) == 3
    profiled = reg.get_sample_value("snnet_compute_profiled_seconds_total", {"stitch": "3"})
    assert profiled == pytest.approx(0.010)


def test_within_a_stitch_the_earliest_deadline_runs_first(digits):
    _, sched, _ = make(lambda s, b: 1.0, max_batch=1)
    order = []

    async def scenario():
        x, now = digits[0][:1], time.monotonic()
        late = sched.submit(x, 3, now + 0.5, now)
        urgent = sched.submit(x, 3, now + 0.05, now)  # queued after, due first
        late.add_done_callback(lambda _: order.append("late"))
        urgent.add_done_callback(lambda _: order.append("urgent"))
        sched.start()
        await asyncio.gather(late, urgent)
        await asyncio.sleep(0)  # let the done-callbacks run

    asyncio.run(scenario())
    sched.stop()
    assert order == ["urgent", "late"]


def test_a_request_whose_client_went_away_leaves_the_queue_unrun(digits):
    """A cancelled request (a gRPC client's deadline or cancel cancels its future) is taken out
    of the queue: no batch runs it and the planner no longer counts it ahead of others."""
    _, sched, _ = make(lambda s, b: 10.0, max_batch=1)
    x = digits[0][:2]

    async def scenario():
        now = time.monotonic()
        first = sched.submit(x, 3, now + 60, now)
        gone = sched.submit(x, 5, now + 60, now)
        last = sched.submit(x, 7, now + 60, now)
        assert sched.queued_images == 6 and sched.queued_work_ms() == pytest.approx(60.0)
        gone.cancel()
        await asyncio.sleep(0)  # its done-callback runs on the loop
        view = sched.view(now + 120, now)
        sched.start()
        return await asyncio.gather(first, last), view

    (first, last), view = asyncio.run(scenario())
    sched.stop()
    assert view.counts == {3: 2, 7: 2} and view.ahead_ms == pytest.approx(40.0)
    assert (first.stitch, last.stitch) == (3, 7)
    reg = sched.metrics.registry
    assert reg.get_sample_value("snnet_withdrawn_images_total") == 2
    assert reg.get_sample_value("snnet_batch_size_sum") == 4  # stitch 5's two never ran
    assert reg.get_sample_value("snnet_queue_depth") == 0


def test_withdraw_takes_a_waiting_job_out_at_once_and_leaves_a_taken_one_to_run(digits):
    """``Scheduler.withdraw`` (an HTTP client gone): a job still queued leaves it in the same
    step as its future is cancelled, so no batch can take it meanwhile (a front frees its
    shared pages at once); one a batch has taken is left alone and answered."""
    _, sched, _ = make(lambda s, b: 10.0, max_batch=1)
    x = digits[0][:2]

    async def scenario():
        now = time.monotonic()
        waits = sched.submit(x, 5, now + 60, now)
        assert sched.waiting(waits) and sched.withdraw(waits)
        assert waits.cancelled() and not sched.waiting(waits) and sched.queued_images == 0
        assert not sched.withdraw(waits)  # (once)
        sched.start()
        taken = sched.submit(x, 3, now + 60, now)
        while sched.waiting(taken):  # until the worker has it in a batch
            await asyncio.sleep(0.001)
        assert not sched.withdraw(taken) and not taken.cancelled()
        return await taken

    result = asyncio.run(scenario())
    sched.stop()
    assert result.stitch == 3
    reg = sched.metrics.registry
    assert reg.get_sample_value("snnet_withdrawn_images_total") == 2
    assert reg.get_sample_value("snnet_batch_size_sum") == 2  # the withdrawn job never ran


def test_a_batch_held_open_whose_head_goes_away_is_chosen_again(digits):
    _, sched, _ = make(lambda s, b: 1.0)
    sched.max_wait_s = 30.0  # the worker holds a batch of one open for more of its stitch
    x = digits[0][:1]

    async def scenario():
        now = time.monotonic()
        sched.start()
        gone = sched.submit(x, 3, now + 60, now)
        while sched.holding is None:  # the worker holds stitch 3's batch open
            await asyncio.sleep(0.001)
        gone.cancel()
        await asyncio.sleep(0)
        now = time.monotonic()
        # Due in 0.5 s (its own hold ends before that): answered then, not after the gone
        # head's 30 s hold, as the worker chooses again without it.
        return await asyncio.wait_for(sched.submit(x, 4, now + 0.5, now), 10)

    result = asyncio.run(asyncio.wait_for(scenario(), 20))
    sched.stop()
    assert result.stitch == 4
    reg = sched.metrics.registry
    assert reg.get_sample_value("snnet_withdrawn_images_total") == 1
    assert reg.get_sample_value("snnet_batch_size_sum") == 1  # stitch 3's never ran


@pytest.mark.timing  # (it times the hold: run alone, not beside a parallel suite)
def test_a_job_due_sooner_that_joins_a_held_batch_does_not_extend_the_hold(digits):
    """The hold is the first head's: one of its stitch due sooner leads the batch but does not
    start a new wait."""
    _, sched, _ = make(lambda s, b: 1.0)
    sched.max_wait_s = 1.0
    x = digits[0][:1]

    async def scenario():
        now = time.monotonic()
        sched.start()
        first = sched.submit(x, 3, now + 60, now)
        while sched.holding is None:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.5)
        now = time.monotonic()
        sooner = sched.submit(x, 3, now + 30, now)
        t0 = time.monotonic()
        return await asyncio.wait_for(asyncio.gather(first, sooner), 10), time.monotonic() - t0

    (a, b), waited = asyncio.run(scenario())
    sched.stop()
    assert a.batch_size == b.batch_size == 2
    assert waited < 0.9  # the rest of the first 1 s (0.5 s), not a new 1 s


def test_the_model_is_idle_again_before_the_answer_arrives(digits):
    """A sequential client's next request must find the model free (slack first relies on it)."""
    _, sched, _ = make(lambda s, b: 1.0)

    async def scenario():
        now = time.monotonic()
        sched.start()
        await sched.submit(digits[0][:1], 0, now + 60, now)
        return sched.view(time.monotonic() + 60, time.monotonic())

    view = asyncio.run(scenario())
    sched.stop()
    assert not view.busy and view.ahead_ms == 0.0


def test_the_http_backlog_estimate():
    ing = Ingress()
    ing.seed([(0, 2.0)])  # start-up: 2 ms a request, whatever its size
    with ing.entered() as ticket:  # only the request being planned
        assert ing.wait_ms() == 0.0
        with ing.entered(300), ing.entered(300), ing.entered(300):
            assert ing.others() == 3 and ing.wait_ms() == pytest.approx(6.0)
        ticket.queued()
        assert ing.unqueued == 0 and ing.backlog_ms == 0.0
    assert ing.unqueued == 0  # leaving twice counts once
    for _ in range(100):
        ing.observe(payload_bytes=1000, after_plan_ms=2.0, http_ms=3.0)
    assert ing.http_ms(1000) == pytest.approx(3.0, rel=1e-3)


def test_the_http_backlog_counts_each_request_by_its_size():
    """Ten 4000x4000 PNGs took 300 ms of HTTP work each; the digits after them take 2 ms. The
    backlog of a burst of digits is 2 ms a digit (one mean for all sizes put 10 photos' worth
    before each and refused most of the burst 503)."""
    ing = Ingress()
    for _ in range(30):
        ing.observe(400, after_plan_ms=1.0, http_ms=2.0)
    for _ in range(10):
        ing.observe(4_000_000, after_plan_ms=290.0, http_ms=300.0)
    assert ing.http_ms(400) == pytest.approx(2.0, rel=0.05)
    assert ing.http_ms(4_000_000) == pytest.approx(300.0, rel=0.05)
    with contextlib.ExitStack() as burst:
        for _ in range(20):
            burst.enter_context(ing.entered(400))
        assert ing.wait_ms(400) == pytest.approx(19 * 2.0, rel=0.05)  # a digit: 19 ahead
        photo = burst.enter_context(ing.entered())  # a 4000x4000 PNG, being read: any request
        digits = 20 * ing.http_ms(400)
        assert ing.wait_ms(400) == pytest.approx(digits - ing.http_ms(400) + ing.http_ms(0))
        photo.sized(4_000_000)  # parsed: its cost size, by its pixels
        assert ing.wait_ms(4_000_000) == pytest.approx(digits)  # the photo waits for 20 digits
        assert ing.wait_ms(400) == pytest.approx(digits - ing.http_ms(400) + 300.0, rel=0.02)
        assert ing.wait_ms() == pytest.approx((digits + 300.0) * 20 / 21, rel=0.02)  # (no size)
    assert ing.unqueued == 0 and ing.backlog_ms == 0.0


def test_the_http_time_line_keeps_its_slope_through_a_long_run_of_one_size():
    """The seed's points fade with every answer but never below KEPT_WEIGHT: after hundreds of
    answers of one size, the slope came to noise and then to 0, and a digit after 300 big PNGs
    was predicted at their 300 ms (or a photo after hours of digits at a digit's 2 ms)."""
    for size, ms, other in ((4_000_000, 300.0, 400), (400, 2.0, 4_000_000)):
        ing = Ingress()
        ing.seed([(900, 1.0), (94_000, 3.0)])  # start-up's decoding: a digit, a photo
        for _ in range(2000):
            ing.observe(size, after_plan_ms=ms - 1.0, http_ms=ms)
        assert ing.http_ms(size) == pytest.approx(ms, rel=0.02)
        assert ing.own_ms(size) == pytest.approx(ms - 1.0, rel=0.02)
        if other < size:  # a digit after the PNGs: about start-up's
            assert ing.http_ms(other) < 5.0 and ing.own_ms(other) < 5.0
        else:  # a photo-sized PNG after the digits: by start-up's slope, far over a digit
            assert ing.http_ms(other) > 20.0 and ing.own_ms(other) > 20.0


def test_the_own_http_cost_is_a_line_in_the_payload_size_learnt_online():
    ing = Ingress()
    ing.seed([(300, 0.1), (170_000, 5.0)])  # start-up: a small PNG and a photo-sized JPEG
    assert ing.own_ms(300) == pytest.approx(0.1, abs=0.01)
    assert ing.own_ms(85_000) == pytest.approx(2.55, rel=0.02)
    for i in range(400):  # the machine turns out twice as slow, plus 1 ms of JSON per request
        nbytes = [500, 50_000, 200_000][i % 3]
        ing.observe(nbytes, after_plan_ms=1.0 + 2 * 5.0 * nbytes / 170_000, http_ms=9.0)
    assert ing.own_ms(200_000) == pytest.approx(1.0 + 2 * 5.0 * 200_000 / 170_000, rel=0.03)
    assert ing.own_ms(0) == pytest.approx(1.0, abs=0.05)


def test_loop_lag_shows_up_in_the_ingress_estimate():
    ing = Ingress()

    async def scenario():
        watcher = asyncio.create_task(ing.watch_loop_lag(period_s=0.001))
        await asyncio.sleep(0)  # let it start its first sleep
        for _ in range(10):
            start = time.perf_counter()
            while time.perf_counter() - start < 0.02:  # the loop is busy for 20 ms
                pass
            await asyncio.sleep(0)  # yield: the watcher's timer expired meanwhile and runs now
        watcher.cancel()

    asyncio.run(scenario())
    assert ing.loop_lag_ms > 5.0 and ing.wait_ms() >= ing.loop_lag_ms


def test_loop_lag_during_start_up_is_not_counted():
    """While start-up holds the loop back (profiling, warm-up, the final full GC), the lag is
    start-up's: counted, it made the first request after `ready` look ~35 ms dearer."""
    ing = Ingress()
    ing.serving = False

    async def scenario():
        watcher = asyncio.create_task(ing.watch_loop_lag(period_s=0.001))
        await asyncio.sleep(0)
        for _ in range(5):
            start = time.perf_counter()
            while time.perf_counter() - start < 0.02:  # start-up keeps the loop busy
                pass
            await asyncio.sleep(0)
        ing.serving = True  # ready: a tick that began before this is still start-up's
        start = time.perf_counter()
        while time.perf_counter() - start < 0.02:
            pass
        await asyncio.sleep(0)
        assert ing.loop_lag_ms == 0.0
        for _ in range(5):  # serving from here: counted
            start = time.perf_counter()
            while time.perf_counter() - start < 0.02:
                pass
            await asyncio.sleep(0.002)
        watcher.cancel()

    asyncio.run(scenario())
    assert ing.loop_lag_ms > 5.0


def test_the_idle_http_estimates_learn_only_from_requests_served_alone():
    ing = Ingress()
    ing.seed([(300, 0.1)])
    assert ing.rest_ms(300) == pytest.approx((0.9, 0.1))  # none alone yet: start-up's figures
    for _ in range(100):  # a burst: slow, and never alone
        ing.observe(300, after_plan_ms=4.0, http_ms=9.0, spent_ms=5.0)
    assert ing.own_ms(300) == pytest.approx(4.0, rel=0.2)  # what requests cost now
    assert ing.rest_ms(300) == pytest.approx((0.9, 0.1))  # not what they cost on an idle server
    assert ing.rest_pre_high_ms(300) == pytest.approx(0.9)
    for spent in (0.3, 0.2, 40.0, 0.4):  # served alone; one stalled (a first request's paths)
        ing.observe(300, after_plan_ms=0.2, http_ms=0.5, alone=True, spent_ms=spent)
    assert ing.rest_ms(300) == pytest.approx((0.35, 0.2))  # the medians: the stall is ignored
    with ing.entered():
        start = ing.arrivals
    with ing.entered():
        assert ing.arrivals == start + 1  # what tells a request it was not alone


def test_a_nan_answer_fails_its_own_request_not_its_batch_mates(digits):
    """A request whose answer is NaN or infinite (an input of 1e30 overflows in the model) gets
    a ComputeError that says so (it was a 500 "internal error", where JSON cannot carry NaN, or
    NaN probabilities); the request batched with it is answered."""
    from server.errors import ComputeError

    _, sched, net = make(lambda s, b: 1.0, max_batch=8)
    good, huge = digits[0][:1], torch.full_like(digits[0][:1], 1e30)
    with torch.no_grad():
        assert not torch.isfinite(net(huge, 2)).all()  # (what the model makes of it)

    async def scenario():
        now = time.monotonic()
        futs = [sched.submit(x, 2, now + 60, now) for x in (good, huge)]
        sched.start()  # both queued: one batch of 2
        return await asyncio.gather(*futs, return_exceptions=True)

    ok, failed = asyncio.run(scenario())
    sched.stop()
    assert ok.batch_size == 2 and torch.isfinite(ok.logits).all()
    assert isinstance(failed, ComputeError) and "NaN or infinite" in str(failed)


@pytest.mark.timing  # (a busy loop on a CPU: not beside the parallel suite)
@pytest.mark.skipif(not RunDelay.of_thread().available, reason="no /proc/<pid>/schedstat here")
def test_a_cold_batch_that_waited_for_a_cpu_teaches_nothing_about_pauses():
    """What a batch after a pause runs over its prediction is the pause's cost, planned for the
    next one; a batch that shared its CPU with a busy loop (a co-tenant) ran over for another
    reason, which the device factor follows, and must not make every later pause look dear."""
    _, sched, net = make(lambda s, b: 1.0, max_batch=256, max_queue=256)
    x = torch.zeros(256, *net.input_size)  # about 15 ms of one thread here
    sched._cold.clear()
    sched._cold_ms = 0.0
    cpu = min(os.sched_getaffinity(0))
    threads = torch.get_num_threads()

    async def cold_batches(count: int):
        results = []
        for _ in range(count):
            sched._idle_since = time.monotonic() - 1.0
            now = time.monotonic()
            results.append(await sched.submit(x, 22, now + 60, now))
        return results

    try:
        torch.set_num_threads(1)
        sched.start()
        quiet = asyncio.run(cold_batches(3))  # a quiet machine
        os.sched_setaffinity(sched._thread.native_id, {cpu})
        with busy_loop_on(cpu):
            busy = asyncio.run(cold_batches(3))
        waited = sorted(r.wait_ms / r.compute_ms for r in busy)
        assert waited[1] > 0.2, waited  # the median of 3: the worker waited for the busy loop
        # What each batch ran over its 1 ms is learnt unless its worker waited over a tenth of
        # it (a quiet machine's batch too: under pytest here a third of them did, 2.6-5.3 ms;
        # in a plain script none).
        learnt = [r for r in quiet + busy if r.wait_ms <= CONTENDED_SHARE * r.compute_ms]
        assert len(sched._cold) == len(learnt)
    finally:
        sched.stop()
        torch.set_num_threads(threads)
