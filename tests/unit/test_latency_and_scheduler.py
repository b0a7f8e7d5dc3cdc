"""The latency model and the scheduler's choices, on the tiny real family with a known profile."""

import asyncio
import time

import pytest
import torch

from server.latency import LatencyModel
from server.scheduler import ChoiceError, Scheduler
from snnet_core import DeviceFingerprint, LatencyProfile
from tests.conftest import TINY_NUM_STITCHES, build_tiny


def profile(ms_of):
    fp = DeviceFingerprint.current("cpu", torch.float32)
    return LatencyProfile(
        fp,
        [1, 2, 4, 8],
        {s: {b: ms_of(s, b) for b in (1, 2, 4, 8)} for s in range(TINY_NUM_STITCHES)},
    )


def test_prediction_interpolates_and_never_falls_with_batch():
    m = LatencyModel(profile(lambda s, b: {1: 2.0, 2: 3.0, 4: 1.0, 8: 9.0}[b]))  # bs 4 is noise
    assert m.predict_ms(0, 1) == 2.0 and m.predict_ms(0, 2) == 3.0
    assert m.predict_ms(0, 4) == 3.0  # raised to bs 2's
    assert m.predict_ms(0, 6) == pytest.approx(6.0)  # between 4 (3.0) and 8 (9.0)
    assert m.predict_ms(0, 16) == pytest.approx(21.0)  # extrapolated from 4 and 8


def test_corrections_converge_to_the_observed_ratio():
    m = LatencyModel(profile(lambda s, b: 10.0 * b), smoothing=0.2)
    for _ in range(60):
        m.observe(3, 2, 40.0)  # twice as slow as profiled
    assert m.correction(3) == pytest.approx(2.0, rel=1e-3)
    assert m.predict_ms(3, 4) == pytest.approx(80.0, rel=1e-3)
    assert m.correction(4) == 1.0  # other stitches untouched
    for _ in range(60):
        m.observe(3, 2, 20.0)
    assert m.correction(3) == pytest.approx(1.0, rel=1e-3)


def make_scheduler(ms_of, max_batch=4, max_queue=64):
    net = build_tiny().eval()
    lat = LatencyModel(profile(ms_of))
    ranking = list(range(TINY_NUM_STITCHES - 1, -1, -1))  # pretend: higher id = more accurate
    return Scheduler(
        net,
        lat,
        ranking,
        device=torch.device("cpu"),
        dtype=torch.float32,
        max_batch=max_batch,
        max_wait_ms=0,
        max_queue=max_queue,
    ), net


def test_choice_is_the_best_stitch_that_fits():
    sched, _ = make_scheduler(lambda s, b: (s + 1) * b)  # stitch s: (s+1) ms per image
    assert sched.choose(1000.0).stitch == TINY_NUM_STITCHES - 1
    assert sched.choose(5.5).stitch == 4
    assert sched.choose(5.5, n=2).stitch == 1  # a 2-image request costs twice as much
    assert sched.choose(100, candidates=[0, 3, 7]).stitch == 7


def test_budget_below_the_fastest_idle_stitch_is_422_with_the_time():
    sched, _ = make_scheduler(lambda s, b: (s + 1) * b)
    with pytest.raises(ChoiceError) as e:
        sched.choose(0.5)
    assert e.value.status == 422
    assert (
        "1.00 ms for stitch 0" in e.value.detail and "latency_budget_ms >= 1.00" in e.value.detail
    )


def test_queue_shifts_choices_to_cheaper_stitches_then_sheds():
    sched, net = make_scheduler(lambda s, b: (s + 1) * b)  # stitch s: (s+1) ms per image
    x = torch.zeros(1, *net.input_size)

    async def scenario():
        # Worker not started: queued work stays queued and is part of every prediction.
        for _ in range(3):  # 3 images of stitch 9 (10 ms each) due in 20 ms: the third is late
            sched.submit(x, 9, 20.0)
        behind = sched.choose(45.5).stitch  # due after them: waits 30 ms, 15.5 ms left
        with pytest.raises(ChoiceError) as e:
            sched.choose(25.0)  # even stitch 0 (1 ms) behind 30 ms of work misses it
        return behind, e.value

    behind, err = asyncio.run(scenario())
    assert behind == 14  # 30 + 15 ms
    assert err.status == 503 and err.retry_after_s >= 1 and "no stitch can answer" in err.detail


def test_earlier_deadlines_go_first_but_never_make_queued_requests_late():
    sched, net = make_scheduler(lambda s, b: (s + 1) * b)
    x = torch.zeros(1, *net.input_size)

    async def scenario():
        for _ in range(3):  # stitch 9 jobs due in 40.5 ms, predicted done at 10, 20, 30 ms
            sched.submit(x, 9, 40.5)
        # Due before them, so it runs first: it need not wait, but it may only take as long
        # as the tightest of them can spare (10.5 ms): stitch 9, not 22 (23 ms, which fits
        # its own 30 ms budget).
        first = sched.choose(30.0).stitch
        for _ in range(2):  # more stitch 9 jobs due in 50.5 ms: done at 40 and 50, 0.5 ms spare
            sched.submit(x, 9, 50.5)
        with pytest.raises(ChoiceError) as e:
            sched.choose(30.0)  # even stitch 0 (1 ms) would make the last one late
        return first, e.value

    first, err = asyncio.run(scenario())
    assert first == 9
    assert err.status == 503 and "miss their deadlines" in err.detail


def test_requests_without_a_budget_do_not_block_urgent_ones():
    sched, net = make_scheduler(lambda s, b: (s + 1) * b)
    x = torch.zeros(4, *net.input_size)

    async def scenario():
        sched.submit(x, 9, None)  # 40 ms of work, ordered as if due in order_budget_ms (1 s)
        return sched.choose(30.0)

    choice = asyncio.run(scenario())
    assert choice.stitch == 22 and choice.predicted_wait_ms == 0.0  # runs first


def test_full_queue_is_refused():
    sched, net = make_scheduler(lambda s, b: 1.0, max_queue=2)
    x = torch.zeros(2, *net.input_size)

    async def scenario():
        sched.submit(x, 0, None)
        with pytest.raises(ChoiceError, match="queue full") as e:
            sched.submit(x, 0, None)
        return e.value.status

    assert asyncio.run(scenario()) == 503


def test_worker_batches_requests_and_answers_each_correctly(digits):
    sched, net = make_scheduler(lambda s, b: 1.0, max_batch=8)
    images = digits[0][:12]
    with torch.no_grad():
        expected = {s: net(images, s) for s in (2, 5)}

    async def scenario():
        futs = [(i, s, sched.submit(images[i : i + 1], s, None)) for i in range(12) for s in (2, 5)]
        sched.start()  # everything already queued: batches of up to 8 per stitch
        return [(i, s, await f) for i, s, f in futs]

    results = asyncio.run(scenario())
    sched.stop()
    for i, s, r in results:
        assert r.stitch == s
        torch.testing.assert_close(r.logits[0], expected[s][i], rtol=1e-4, atol=1e-5)
    assert max(r.batch_size for _, _, r in results) == 8


def test_stop_drains_everything_accepted(digits):
    sched, net = make_scheduler(lambda s, b: 1.0)

    async def scenario():
        futs = [sched.submit(digits[0][:1], s % 5, None) for s in range(10)]
        sched.start()
        await asyncio.to_thread(sched.stop)
        with pytest.raises(ChoiceError, match="shutting down"):
            sched.submit(digits[0][:1], 0, None)
        return await asyncio.gather(*futs)

    start = time.monotonic()
    results = asyncio.run(scenario())
    assert len(results) == 10 and all(r.logits.shape == (1, 10) for r in results)
    assert time.monotonic() - start < 60


def test_http_backlog_counts_in_the_choice():
    sched, _ = make_scheduler(lambda s, b: (s + 1) * b)
    assert sched.choose(12.0).stitch == 11
    assert sched.choose(12.0, extra_wait_ms=6.0).stitch == 5  # 6 ms of HTTP backlog ahead
    with pytest.raises(ChoiceError) as e:
        sched.choose(12.0, extra_wait_ms=11.5)
    assert e.value.status == 503


def test_service_estimates_the_http_backlog(tmp_path):
    from server.config import Settings
    from server.metrics import Metrics
    from server.service import ModelService

    svc = ModelService(Settings(weights=tmp_path), Metrics())
    svc.http_ms = 2.0
    svc.in_flight = 1  # only the request being chosen for
    assert svc.ingress_wait_ms() == 0.0
    svc.in_flight = 4
    assert svc.ingress_wait_ms() == pytest.approx(6.0)
    for _ in range(100):
        svc.observe_http(total_ms=10.0, queue_ms=3.0, compute_ms=4.0)
    assert svc.http_ms == pytest.approx(3.0, rel=1e-3)


def test_loop_lag_shows_up_in_the_ingress_estimate(tmp_path):
    from server.config import Settings
    from server.metrics import Metrics
    from server.service import ModelService

    svc = ModelService(Settings(weights=tmp_path), Metrics())

    async def scenario():
        watcher = asyncio.create_task(svc.watch_loop_lag(period_s=0.001))
        await asyncio.sleep(0)  # let it start its first sleep
        for _ in range(10):
            start = time.perf_counter()
            while time.perf_counter() - start < 0.02:  # the loop is busy for 20 ms
                pass
            await asyncio.sleep(0)  # yield: the watcher's timer expired meanwhile and runs now
        watcher.cancel()

    asyncio.run(scenario())
    assert svc.loop_lag_ms > 5.0
    assert svc.ingress_wait_ms() >= svc.loop_lag_ms


def test_a_request_larger_than_max_batch_runs_in_max_batch_chunks(digits):
    from server.metrics import Metrics

    net = build_tiny().eval()
    m = Metrics()
    sched = Scheduler(
        net, LatencyModel(profile(lambda s, b: 1.0 * b)), list(range(TINY_NUM_STITCHES)),
        device=torch.device("cpu"), dtype=torch.float32, max_batch=4, max_wait_ms=0,
        max_queue=64, metrics=m,
    )  # fmt: skip
    images = digits[0][:10]
    with torch.no_grad():
        expected = net(images, 3)

    async def scenario():
        fut = sched.submit(images, 3, None)
        sched.start()
        return await fut

    result = asyncio.run(scenario())
    sched.stop()
    torch.testing.assert_close(result.logits, expected, rtol=1e-4, atol=1e-5)
    # As predicted: 4 + 4 + 2, never one batch of 10.
    assert sched.idle_ms(3, 10) == pytest.approx(10.0)
    assert (
        m.batch_size._sum.get() == 10
        and m.registry.get_sample_value("snnet_batch_size_bucket", {"le": "4.0"}) == 3
    )
    assert m.registry.get_sample_value(
        "snnet_compute_profiled_seconds_total", {"stitch": "3"}
    ) == pytest.approx(0.010)


def test_requests_without_a_budget_are_not_starved_by_requests_with_one(digits):
    sched, net = make_scheduler(lambda s, b: 1.0)
    x = digits[0][:1]
    order = []

    async def scenario():
        no_budget = sched.submit(x, 1, None)  # ordered as if due in order_budget_ms (1 s)
        later = [sched.submit(x, 2, 5000.0) for _ in range(3)]  # due later than that
        for name, f in [("none", no_budget), *[("budget", f) for f in later]]:
            f.add_done_callback(lambda _, n=name: order.append(n))
        sched.start()
        await asyncio.gather(no_budget, *later)
        await asyncio.sleep(0)  # let the done-callbacks run

    asyncio.run(scenario())
    sched.stop()
    assert order[0] == "none"


def test_static_choice_ignores_the_queue():
    sched, net = make_scheduler(lambda s, b: (s + 1) * b)
    x = torch.zeros(1, *net.input_size)

    async def scenario():
        for _ in range(3):
            sched.submit(x, 9, 10.0)  # 30 ms of queued work, all due first
        static = sched.choose(12.0, static=True)
        with pytest.raises(ChoiceError) as e:  # queue-aware: nothing fits 12 ms behind 30 ms
            sched.choose(12.0)
        return static, e.value

    static, err = asyncio.run(scenario())
    assert static.stitch == 11  # as if idle: 12 ms per image fits stitch 11
    assert err.status == 503


def test_within_a_stitch_the_earliest_deadline_runs_first(digits):
    sched, _ = make_scheduler(lambda s, b: 1.0, max_batch=1)
    order = []

    async def scenario():
        x = digits[0][:1]
        late = sched.submit(x, 3, 500.0)
        urgent = sched.submit(x, 3, 50.0)  # queued after, due first
        late.add_done_callback(lambda _: order.append("late"))
        urgent.add_done_callback(lambda _: order.append("urgent"))
        sched.start()
        await asyncio.gather(late, urgent)
        await asyncio.sleep(0)  # let the done-callbacks run

    asyncio.run(scenario())
    sched.stop()
    assert order == ["urgent", "late"]


def test_the_network_allowance_comes_off_every_budget():
    sched, _ = make_scheduler(lambda s, b: (s + 1) * b)
    assert sched.choose(15.5).stitch == 14
    assert sched.choose(15.5, network_ms=5.0).stitch == 9  # 10.5 ms left for the server
    with pytest.raises(ChoiceError) as e:
        sched.choose(5.5, network_ms=5.0)  # 0.5 ms left: not even stitch 0 (1 ms)
    assert e.value.status == 422
    assert "5 ms reserved for the network (SNNET_NETWORK_MS)" in e.value.detail
    assert "latency_budget_ms >= 6.00" in e.value.detail
