"""The controller's remote mode against a real Prometheus scraping a live `snnet serve`."""

import time

import httpx
import pytest

from server.controller import PrometheusSource
from tests._prometheus import Prometheus
from tests._servers import SnnetServer, suite_profile_cache


def poll(fetch, until, timeout: float = 60.0, what: str = ""):
    """fetch() until until(value) holds: state on another process, so polling is the only way."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value}")
        time.sleep(0.2)  # the state lives in other processes: nothing to await but a re-read


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("prom")
    prom = Prometheus({}, work / "prometheus")  # the port is known before it starts
    srv = SnnetServer(
        {
            "SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory),
            "SNNET_PROMETHEUS_URL": prom.url,
            "SNNET_PROMETHEUS_PERIOD_S": "0.5",
            "SNNET_CONTROLLER_PERIOD_S": "0.1",
            # A shared Prometheus scrapes other deployments too: count this one only.
            "SNNET_PROMETHEUS_SELECTOR": 'job="snnet"',
        }
    )
    target = {"static_configs": [{"targets": [f"127.0.0.1:{srv.port}"]}]}
    prom.config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        # The same series under a second job: another deployment's, as far as the queries see.
        "scrape_configs": [{"job_name": "snnet", **target}, {"job_name": "other", **target}],
    }
    try:
        srv.wait_for("ready in")
        prom.start()
        yield srv, prom
    finally:
        prom.stop()
        srv.stop()


def test_controller_reads_fleet_figures_from_prometheus(stack, digits):
    import base64
    import io

    from PIL import Image

    srv, prom = stack
    buf = io.BytesIO()
    Image.fromarray((digits[0][0, 0].numpy() * 255).round().astype("uint8"), "L").save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    with httpx.Client(base_url=srv.url, timeout=60) as c:

        def send_and_read():
            for sid in (0, 2):
                assert (
                    c.post("/classify", json={"image": image, "stitch_id": sid}).status_code == 200
                )
            return c.get("/controller").json()["fleet"]

        fleet = poll(
            send_and_read,
            lambda f: (
                f
                and f["arrival_rate"]
                and f["replicas"] == 1
                and {"0", "2"} <= set(f["corrections"])
            ),
            what="fleet figures from Prometheus",
        )
        assert fleet["error"] is None and fleet["arrival_rate"] > 0
        # One replica, though Prometheus holds two of every series: the selector's job only.
        assert PrometheusSource(prom.url).fleet().replicas == 2
        # The same figure, asked of Prometheus directly, agrees in magnitude.
        direct = float(
            prom.query('sum(rate(snnet_arrivals_total{job="snnet"}[1m]))')[0]["value"][1]
        )
        assert 0.2 * direct <= fleet["arrival_rate"] <= 5 * direct
        for ratio in fleet["corrections"].values():
            assert 0.05 < ratio < 20  # observed / profiled compute: the same order

        # Prometheus's own error message reaches the caller of a bad query.
        with pytest.raises(RuntimeError, match="parse error"):
            PrometheusSource(prom.url).query("sum(rate(snnet_arrivals_total[1m])")

        # Prometheus gone: the error shows, the local loop and the service go on.
        prom.stop()
        before = c.get("/controller").json()["updates"]
        state = poll(
            lambda: c.get("/controller").json(),
            lambda s: s["fleet"]["error"] and s["updates"] > before,
            what="the query error in the controller state",
        )
        assert "unreachable" in state["fleet"]["error"]
        assert c.post("/classify", json={"image": image}).status_code == 200
