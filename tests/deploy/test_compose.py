"""docker-compose.yml against the Compose Specification's JSON schema (the copy that the
check-jsonschema package vendors from github.com/compose-spec/compose-spec, Apache-2.0), and
the wiring between its services. Not checked (no Docker engine): that the images pull and run."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import jsonschema
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SCHEMA = json.loads(
    files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
)


def test_valid_against_the_compose_specification():
    validator = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(COMPOSE)
    ]
    assert not errors, errors


def test_the_schema_rejects_a_broken_file():
    broken = {"services": {"snnet": {"image": "x", "depends_on": {"db": {"condition": "soon"}}}}}
    assert not jsonschema.validators.validator_for(SCHEMA)(SCHEMA).is_valid(broken)


def test_every_service_has_a_healthcheck_and_waits_for_healthy_dependencies():
    services = COMPOSE["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services and cond == {"condition": "service_healthy"}, name
            assert "healthcheck" in services[dep], dep
    assert {"snnet", "prometheus", "grafana"} <= set(services)
    assert "readyz" in " ".join(services["snnet"]["healthcheck"]["test"])


def test_service_settings_and_mounts_match_the_deploy_files():
    services = COMPOSE["services"]
    env = services["snnet"]["environment"]
    Settings(**{k.removeprefix("SNNET_").lower(): v for k, v in env.items()})
    # Prometheus reads deploy/prometheus and scrapes the service by its compose name.
    prom = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["snnet:8000"]
    # Grafana: anonymous viewers, the provisioned datasource points at the compose Prometheus.
    grafana = services["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    datasources = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    # The demo load is the script the live Prometheus test runs.
    assert "./deploy/loadgen.py:/opt/loadgen.py:ro" in services["loadgen"]["volumes"]
