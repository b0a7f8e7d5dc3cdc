"""The shipped Prometheus rules, Grafana dashboard and prometheus-adapter queries against a real
service scraped by a real Prometheus on loopback.

Prometheus runs with deploy/prometheus/prometheus.yml, changed only where it must be: a 1 s
scrape and evaluation interval (so the test takes seconds) and the service's loopback address as
the target. Traffic comes from deploy/loadgen.py, the demo load of docker-compose.yml. Then every
PromQL expression of the dashboard and of the rules must parse and return data.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests._prometheus import Prometheus
from tests._servers import SnnetServer, suite_profile_cache

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
# Grafana picks $__rate_interval from the scrape interval and zoom; any window holding a few of
# the test's 1 s scrapes does.
RATE_INTERVAL = "30s"


def live_config(target: str) -> dict:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "snnet"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


def rules() -> list[dict]:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    return [
        rule
        for f in config["rule_files"]
        for group in yaml.safe_load((PROM_DIR / f).read_text())["groups"]
        for rule in group["rules"]
    ]


# What Grafana puts in for the dashboard's variables: its default job, and "All" (the variable's
# allValue) for namespace and replica. (The test's server has no namespace label: ".*" matches
# a missing label too, as on docker-compose.)
VARIABLES = {"$__rate_interval": RATE_INTERVAL, "$job": "snnet", "$namespace": ".*",
             "$instance": ".*"}  # fmt: skip


def grafana(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/snnet.json").read_text())
    return [
        (f"{panel['title']} / {t['refId']}", grafana(t["expr"]))
        for panel in dash["panels"]
        for t in panel["targets"]
    ] + [
        # the series the variables list their values from (label_values(<series>, <label>))
        (f"variable {v['name']}", grafana(v["query"].split("(", 1)[1].rsplit(",", 1)[0]))
        for v in dash["templating"]["list"]
    ]


def adapter_exprs() -> list[tuple[str, str]]:
    """prometheus-adapter's metricsQuery templates, filled in as the adapter would for one pod.

    On Kubernetes the adapter selects on the namespace and pod labels that the scrape adds;
    on loopback the series have job and instance instead.
    """
    values = yaml.safe_load((ROOT / "deploy/k8s/prometheus-adapter-values.yaml").read_text())
    return [
        (
            rule["name"]["as"],
            rule["metricsQuery"]
            .replace("<<.LabelMatchers>>", 'job="snnet"')
            .replace("<<.GroupBy>>", "instance"),
        )
        for rule in values["rules"]["custom"]
    ]


# "<figure> <comparison> <threshold>", the form alerts.yml promises: the threshold a number or
# a recorded series (the deployment's own promise, job:snnet_slo_target:min, checked below as a
# recording rule).
ALERT = re.compile(
    r"^(?P<figure>.+?)\s*(==|!=|<=|>=|<|>)\s*([0-9.eE+-]+|[a-z_]+:[a-z_:0-9]+)$", re.S
)

CASES = (
    [pytest.param(e, id=f"dashboard: {name}") for name, e in dashboard_exprs()]
    + [pytest.param(r["expr"], id=f"record: {r['record']}") for r in rules() if "record" in r]
    # The recorded series themselves: the rules were evaluated, not only parseable.
    + [pytest.param(r["record"], id=f"recorded: {r['record']}") for r in rules() if "record" in r]
    + [
        pytest.param(ALERT.match(r["expr"].strip())["figure"], id=f"alert: {r['alert']}")
        for r in rules()
        if "alert" in r
    ]
    + [pytest.param(e, id=f"adapter: {name}") for name, e in adapter_exprs()]
)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("live")
    # Two API workers: the owner and a front (the fronts' panels need one), the load spread
    # over both.
    env = {
        "SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory),
        "SNNET_API_WORKERS": "2",
    }
    with SnnetServer(env) as server:
        server.wait_for("ready in")
        with Prometheus(live_config(f"127.0.0.1:{server.port}"), tmp / "prometheus") as prom:
            prom.wait_for('up{job="snnet"} == 1')
            load = subprocess.run(
                [sys.executable, str(ROOT / "deploy/loadgen.py"), "--url", server.url]
                + ["--rate", "40", "--requests", "160", "--duration", "60"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert load.returncode == 0, load.stderr
            assert "200:" in load.stdout, load.stdout
            # Data from after the traffic: the last requests have been scraped and the recording
            # rules evaluated on them.
            prom.wait_for("job:snnet_gflops_served:mean_5m > 0")
            yield prom


@pytest.mark.parametrize("expr", CASES)
def test_expression_returns_data(prometheus, expr):
    prometheus.wait_for(expr, timeout=20)


def test_alert_expressions_parse(prometheus):
    for rule in rules():
        if "alert" in rule:
            assert ALERT.match(rule["expr"].strip()), rule["expr"]
            prometheus.query(rule["expr"])  # raises with Prometheus's message if it does not parse


def test_a_bad_expression_is_reported_with_prometheus_message(prometheus):
    with pytest.raises(AssertionError, match="parse error"):
        prometheus.query("sum(rate(snnet_requests_total[5m])")
