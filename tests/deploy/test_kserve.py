"""deploy/kserve: the ClusterServingRuntime and InferenceServices, checked as far as can be done
without a cluster. No package ships KServe's CRD schemas, so their own fields are checked here
against what KServe documents; the runtime's container is validated against the Kubernetes
Container schema (strict), and `snnet serve` is started with exactly its args and env (the
checkpoint path and ports swapped for the bundled weights and free ports) and answers the
Open Inference Protocol under the InferenceService's name."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml

from server.cli import build_parser
from server.config import Settings
from tests._prometheus import free_port
from tests._servers import SnnetServer, suite_profile_cache

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
SNNET = str(Path(sys.executable).with_name("snnet"))


def load(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


@pytest.fixture(scope="module")
def runtime() -> dict:
    return load("servingruntime.yaml")


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    return {n: load(n) for n in ("inferenceservice.yaml", "inferenceservice-grpc.yaml")}


def container(runtime: dict) -> dict:
    (c,) = runtime["spec"]["containers"]
    return c


def test_the_runtime_is_a_kserve_v2_and_grpc_v2_runtime(runtime):
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert runtime["kind"] == "ClusterServingRuntime"
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    c = container(runtime)
    assert c["name"] == "kserve-container"  # the name KServe injects the model storage into
    assert [p["containerPort"] for p in c["ports"]] == [8080]  # KServe's HTTP port
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["SNNET_WEIGHTS"] == "/mnt/models"  # where the storage initializer puts it
    # The model process maps the weights through /dev/shm: a memory volume larger than the
    # pod's 64 MB default, as the Deployment's
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (shm,) = [v for v in runtime["spec"]["volumes"] if v["name"] == mount["name"]]
    assert shm["emptyDir"]["medium"] == "Memory"


def test_the_runtime_container_validates_against_the_kubernetes_schema(runtime):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": [container(runtime)], "volumes": runtime["spec"]["volumes"]},
    }
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_every_setting_the_runtime_gives_is_a_valid_setting(runtime, monkeypatch):
    c = container(runtime)
    args = build_parser().parse_args(["serve", *c["args"]])
    for e in c["env"]:
        monkeypatch.setenv(e["name"], e["value"])
    s = Settings(host=args.host, port=args.port, model_name=args.model_name)
    assert (s.host, s.port, s.grpc_port, s.model_name) == ("0.0.0.0", 8080, 8081, "{{.Name}}")


def test_the_inference_services_use_the_runtime(runtime, services):
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    grpc_port = int({e["name"]: e["value"] for e in container(runtime)["env"]}["SNNET_GRPC_PORT"])
    for name, isvc in services.items():
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1", name
        assert isvc["kind"] == "InferenceService", name
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in formats
        assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
        assert model["storageUri"]
    grpc = services["inferenceservice-grpc.yaml"]["spec"]["predictor"]["model"]
    assert grpc["protocolVersion"] == "grpc-v2"
    assert grpc["ports"] == [{"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}]


def test_snnet_serve_started_as_the_runtime_says_answers_v2_under_the_service_name(
    runtime, services, tmp_path_factory
):
    c = container(runtime)
    name = services["inferenceservice.yaml"]["metadata"]["name"]
    http_port, grpc_port = free_port(), free_port()
    args = [a.replace("{{.Name}}", name) for a in c["args"]]
    args = [f"--port={http_port}" if a.startswith("--port=") else a for a in args]
    args = ["--host=127.0.0.1" if a.startswith("--host=") else a for a in args]
    env = {e["name"]: e["value"] for e in c["env"]}
    env |= {
        "SNNET_WEIGHTS": str(ROOT / "weights"),  # in the pod: /mnt/models
        "SNNET_GRPC_PORT": str(grpc_port),
        "SNNET_PROFILE_CACHE": suite_profile_cache(tmp_path_factory),
    }
    with SnnetServer(env, command=[SNNET, "serve", *args]) as srv:
        srv.wait_for("ready in")
        url = f"http://127.0.0.1:{http_port}"
        assert httpx.get(url + c["readinessProbe"]["httpGet"]["path"]).status_code == 200
        meta = httpx.get(f"{url}/v2/models/{name}").json()
        assert meta["name"] == name and meta["inputs"][0]["name"] == "image"
        import tritonclient.grpc as tgrpc

        with tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as g:
            assert g.is_model_ready(name)
