"""The controller on a live `snnet serve`: a burst of requests raises the load level, moves work to
cheaper stitches and sheds with 503 + Retry-After; the level falls back afterwards.

Served: the bundled SN-Net, whose stitches differ several times over in compute (weights/README.md
has the ratios).
"""

import concurrent.futures
import io
import threading
import time

import httpx
import pytest
from PIL import Image

from snnet_core.data import mnist_subset
from tests._servers import bundled

pytestmark = pytest.mark.timing  # `make test` runs it alone (pyproject's markers)

IMAGES = 8  # per request: one full batch


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from bundled(tmp_path_factory, SNNET_CONTROLLER_PERIOD_S="0.1")


@pytest.fixture(scope="module")
def pngs():
    x, _ = mnist_subset("held_out")
    out = []
    for i in range(IMAGES):
        buf = io.BytesIO()
        Image.fromarray((x[i, 0].numpy() * 255).round().astype("uint8"), "L").save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def classify(client: httpx.Client, pngs, budget_ms: float) -> httpx.Response:
    files = [("image", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
    return client.post("/classify", files=files, data={"latency_budget_ms": str(budget_ms)})


def test_burst_raises_the_load_level_sheds_and_recovers(server, pngs):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        menu = c.get("/stitches").json()["stitches"]
        best = max(menu, key=lambda r: (r["accuracy"], r["gflops"]))
        # The burst's budget: room for one and a half full batches of the most accurate stitch.
        budget = 1.5 * best["predicted_ms"][str(IMAGES)]
        # The first request after start-up runs cold paths (its HTTP work, the model's first
        # batch after a pause) and may rightly be planned on a cheaper stitch at this budget
        # (seen once in CI); the claim below is about a server that has answered one.
        assert classify(c, pngs, 10 * budget).status_code == 200
        # Idle, with room for three batches (1.5 was too few for its HTTP work, the safety
        # margin and a noisy CI machine once): the most accurate stitch, within budget.
        for _ in range(3):
            r = classify(c, pngs, 2 * budget)
            assert r.status_code == 200, r.text
            assert r.json()["stitch"]["id"] == best["id"], (
                r.json()["timing"],
                c.get("/controller").json(),
            )
        poll_deadline = time.monotonic() + 30
        while c.get("/controller").json()["load_level"] > 0:  # settled before the burst
            assert time.monotonic() < poll_deadline, "load level not back to 0 after 30 s"

        levels, stop = [], threading.Event()

        def watch():
            with httpx.Client(base_url=server.url, timeout=60) as w:
                while not stop.is_set():
                    levels.append(w.get("/controller").json()["load_level"])

        watcher = threading.Thread(target=watch)
        watcher.start()
        # 96 requests of 8 images from 16 keep-alive connections, as fast as they answer: 16
        # batches at once are more than even the cheapest stitch can answer within the budget,
        # and it lasts long enough for the smoothed arrival rate to cross the most accurate
        # stitch's capacity (with 48 the burst was over before one controller step saw it, in
        # one full-suite run of three).
        burst, conns = 96, 16

        def client(_):
            with httpx.Client(base_url=server.url, timeout=60) as cc:
                return [classify(cc, pngs, budget) for _ in range(burst // conns)]

        with concurrent.futures.ThreadPoolExecutor(conns) as pool:
            answers = [a for part in pool.map(client, range(conns)) for a in part]

        ok = [a.json() for a in answers if a.status_code == 200]
        shed = [a for a in answers if a.status_code == 503]
        assert len(ok) + len(shed) == burst, [
            (a.status_code, a.text) for a in answers if a.status_code not in (200, 503)
        ]
        assert ok and shed
        for a in shed:  # refused at once, with the reason and when to come back ("not just
            # now" when it found nothing queued, but the burst's effects: a cold batch, a slower
            # device, a busy HTTP layer)
            detail = a.json()["detail"]
            assert detail.startswith(("overloaded:", "not just now:")), detail
            assert "retry later" in detail and int(a.headers["Retry-After"]) >= 1
        # Under the burst part of the work went to cheaper stitches than the best. (Whether the
        # accepted requests met their budgets is not asserted: on a 2-core machine that also
        # runs this test's clients the queue wait is under-predicted during a burst; see
        # bench/load.py for the measured attainment.)
        assert any(o["stitch"]["id"] != best["id"] for o in ok)

        # The level rose during the burst and falls back to 0 once the load is gone.
        deadline = time.monotonic() + 30
        while levels[-1] > 0 and time.monotonic() < deadline:
            stop.wait(0.05)  # the watcher thread keeps polling; nothing else to await
        stop.set()
        watcher.join()
        assert max(levels) > 0 and levels[-1] == 0

        metrics = c.get("/metrics").text
        shed_by = {
            line.split('reason="')[1].split('"')[0]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("snnet_shed_total{")
        }
        assert sum(shed_by.values()) == len(shed)
        # by reason: "not just now" refusals apart from load's ("overloaded:")
        moment = sum(a.json()["detail"].startswith("not just now:") for a in shed)
        assert shed_by == {"queue_full": 0, "overloaded": len(shed) - moment, "slow_now": moment}
        # and the log says so (its first sheds at once, then at most every 10 s), with why
        server.wait_for("(503) since start-up", timeout=10)
        said = server.log[-1]
        assert "WARNING snnet.engine: shed" in said and "load level" in said, said
        assert "the last: overloaded:" in said or "the last: not just now:" in said, said
        assert "snnet_load_level" in metrics and "snnet_arrival_rate" in metrics
        r = classify(c, pngs, 10 * budget)  # and the service is fine afterwards
        assert r.status_code == 200 and r.json()["stitch"]["id"] == best["id"]


@pytest.fixture
def fresh(tmp_path_factory):
    yield from bundled(tmp_path_factory)


def test_a_fresh_servers_first_burst_is_load_not_an_impossible_budget(fresh, pngs):
    """A server whose first traffic is a burst has no idle figures of its own yet: its refusals
    are 503s (load, retry later), never 422s that call the budget too tight even when idle; and
    a lone client after the burst, retrying when told, is served. (The idle need was taken from the burst's answers:
    it read 17-19 ms for a budget of 12.6 ms that an idle server meets, refused 240-280 of 320
    requests 422, and went on refusing the lone client afterwards: a refusal teaches nothing.)"""
    menu = httpx.get(f"{fresh.url}/stitches").json()["stitches"]
    cheapest = min(s["predicted_ms"]["1"] for s in menu)
    budget = round(3 * cheapest + 6.0, 1)  # 12.6 ms here; an idle server answers in 5-8
    one = pngs[:1]
    conns, per = 32, 10

    def client(_):
        with httpx.Client(base_url=fresh.url, timeout=60) as cc:
            return [classify(cc, one, budget) for _ in range(per)]

    with concurrent.futures.ThreadPoolExecutor(conns) as pool:
        answers = [a for part in pool.map(client, range(conns)) for a in part]
    refused = [a for a in answers if a.status_code != 200]
    assert all(a.status_code == 503 for a in refused), [
        (a.status_code, a.json()["detail"]) for a in refused if a.status_code != 503
    ][:3]
    # Alone now, a client that comes back when a 503's Retry-After says: served. (Right after
    # the burst a 503 may say the device runs slower "just now": the burst's slow-down, which
    # fades while requests come and nothing runs, Controller.idle_relax_s; 1.89x in a CI run.)
    refused, deadline = [], time.monotonic() + 30
    with httpx.Client(base_url=fresh.url, timeout=60) as c:
        for _ in range(10):
            while (r := classify(c, one, budget)).status_code == 503:
                assert time.monotonic() < deadline, r.json()
                time.sleep(int(r.headers["Retry-After"]))  # (what the client was told to do)
            refused += [] if r.status_code == 200 else [(r.status_code, r.json())]
    assert not refused, refused[:3]
