"""deploy/prometheus with Prometheus's own tool: the config and rules are valid, and the alerts
fire when they should (promtool test rules on tests/deploy/alerts_test.yml)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests._prometheus import require_binary

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_binary("promtool")


def run(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_config_is_valid_and_loads_every_rule_file(promtool):
    out = run(promtool, "check", "config", str(PROM_DIR / "prometheus.yml"))
    assert f"{len(RULE_FILES)} rule files found" in out
    listed = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())["rule_files"]
    assert sorted(PROM_DIR / f for f in listed) == RULE_FILES


def test_rules_are_valid(promtool):
    run(promtool, "check", "rules", *map(str, RULE_FILES))


def test_alerts_fire_when_they_should(promtool):
    out = run(promtool, "test", "rules", "alerts_test.yml", cwd=ROOT / "tests" / "deploy")
    assert "SUCCESS" in out


def test_every_alert_is_unit_tested_and_explained():
    alerts = [
        rule
        for group in yaml.safe_load((PROM_DIR / "rules" / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]
    tests = yaml.safe_load((ROOT / "tests" / "deploy" / "alerts_test.yml").read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    for rule in alerts:
        assert rule["alert"] in fired, f"{rule['alert']} has no promtool test where it fires"
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_recording_rules_cover_the_figures_the_issue_names():
    records = {
        rule["record"]
        for group in yaml.safe_load((PROM_DIR / "rules" / "recording.yml").read_text())["groups"]
        for rule in group["rules"]
    }
    for figure in ("stitch:snnet_requests", ":p50_", ":p95_", ":p99_", "budget_attainment",
                   "snnet_shed:rate"):  # fmt: skip
        assert any(figure in r for r in records), figure
