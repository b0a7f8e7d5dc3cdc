"""deploy/grafana without a screenshot: the dashboard JSON is complete panel by panel, refers to
the provisioned datasource, and shows what the issue asks for. (That each query returns data
from a real service is tests/integration/test_prometheus_live.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards" / "snnet.json").read_text())
PANELS = DASHBOARD["panels"]


def test_dashboard_header():
    assert DASHBOARD["uid"] and DASHBOARD["title"]
    assert 36 <= DASHBOARD["schemaVersion"] <= 41
    assert len({p["id"] for p in PANELS}) == len(PANELS)


@pytest.mark.parametrize("panel", PANELS, ids=[p["title"] for p in PANELS])
def test_panel_has_datasource_title_query_and_unit(panel):
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert panel["type"] in {"timeseries", "stat"}
    assert panel["title"].strip() and panel["description"].strip()
    assert panel["datasource"] == {"type": ds["type"], "uid": ds["uid"]}
    assert panel["targets"]
    for target in panel["targets"]:
        assert target["expr"].strip() and target["refId"]
        assert target["datasource"] == panel["datasource"]
    assert panel["fieldConfig"]["defaults"]["unit"] not in ("", None)
    grid = panel["gridPos"]
    assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24


def test_panels_do_not_overlap():
    cells = set()
    for p in PANELS:
        g = p["gridPos"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, p["title"]
        cells |= mine


def test_dashboard_shows_what_the_issue_asks_for():
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    for metric in [
        "snnet_requests_total",  # request rate by status
        "snnet_request_duration_seconds_bucket",  # latency percentiles
        "snnet_request_budget_seconds_bucket",  # ... against budget
        "snnet_budget_met_total",  # attainment
        "snnet_shed_total",  # shed rate
        "snnet_best_effort_total",  # budgets below the promise, answered apart from it
        "snnet_stitch_chosen_total",  # stitch mix
        "snnet_gflops_served_total",  # GFLOPs served
        "snnet_queue_depth",
        "snnet_queue_wait_seconds_bucket",
        "snnet_batch_size_bucket",
        "snnet_load_level",  # controller
        "snnet_latency_correction",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "snnet_model_process_cpu_seconds_total",  # the model process, which does the work on CPU
        "snnet_model_process_resident_memory_bytes",
        "snnet_model_cpu_wait_seconds_total",  # other work on the node, in the forwards
        "snnet_front_process_cpu_seconds_total",  # SNNET_API_WORKERS > 1: the fronts' HTTP work
        "snnet_front_process_resident_memory_bytes",
    ]:
        assert metric in exprs, metric
    # Latency percentiles are those of answers: refusals (sub-millisecond) would pull them down.
    # So are the recording rules' (for alerts and other dashboards).
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/recording.yml").read_text())
    exprs = [t["expr"] for p in PANELS for t in p["targets"]]
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    latency = [e for e in exprs if "snnet_request_duration_seconds_bucket" in e]
    assert len(latency) >= 6 and all('status="200"' in e for e in latency), latency
    # Rates follow Grafana's interval, so the panels stay right at any zoom.
    for p in PANELS:
        for t in p["targets"]:
            if "rate(" in t["expr"]:
                assert "[$__rate_interval]" in t["expr"], p["title"]


def test_every_query_keeps_to_the_chosen_job_namespace_and_replicas():
    """A Prometheus shared by several deployments (a cluster's) holds other services' series
    under the same names: every series a panel reads is narrowed by the dashboard's variables,
    job (default snnet), namespace and replica (instance), "All" by default."""
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert list(variables) == ["job", "namespace", "instance"]
    assert variables["job"]["current"]["value"] == "snnet" and not variables["job"]["multi"]
    for name in ("namespace", "instance"):
        v = variables[name]
        assert v["multi"] and v["includeAll"] and v["allValue"] == ".*", v
        assert v["current"]["value"] == ["$__all"]
    for v in variables.values():
        assert v["type"] == "query" and v["query"].startswith("label_values(snnet_ready")
        assert v["datasource"] == PANELS[0]["datasource"]
    wanted = 'job="$job", namespace=~"$namespace", instance=~"$instance"'
    for p in PANELS:
        for t in p["targets"]:
            series = re.findall(r"\b((?:snnet|process)_\w+)(\{[^}]*\})?", t["expr"])
            assert series, t["expr"]
            for name, matchers in series:
                assert matchers.startswith("{" + wanted), (p["title"], name, t["expr"])


def test_provisioning_loads_the_dashboard_folder():
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/snnet.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    (provider,) = providers["providers"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
