"""deploy/k8s: the kustomize base and GPU overlay, rendered by kustomize (`kubectl kustomize`),
validated against the Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict: unknown
fields are errors) and checked for the references between objects that schemas cannot see.

Not checked here (no cluster): that a cluster admits and runs them, the Prometheus Operator and
prometheus-adapter at run time, GPU scheduling.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.config import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}
# The oldest Kubernetes the manifests claim to work on, and the newest the package knows.
VERSIONS = ["1.25.0", kubernetes_validate.latest_version()]


def kustomize(path: Path) -> dict[str, dict]:
    """The rendered objects by kind (each kind appears once in these manifests)."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        msg = "kubectl (for `kubectl kustomize`) not found; install kubectl or kustomize"
        pytest.fail(msg) if os.environ.get("CI") else pytest.skip(msg)
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


@pytest.fixture(scope="module", params=list(OVERLAYS))
def rendered(request) -> dict[str, dict]:
    return kustomize(OVERLAYS[request.param])


def container(objs: dict[str, dict]) -> dict:
    (c,) = objs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def subset(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def test_every_core_object_validates_against_the_kubernetes_schemas(rendered):
    assert set(rendered) == {
        "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }  # fmt: skip
    for kind, obj in rendered.items():
        if kind == "ServiceMonitor":
            continue  # a CRD: no schema in kubernetes-validate; see the next test
        for version in VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_is_strict():
    deployment = kustomize(OVERLAYS["base"])["Deployment"]
    deployment["spec"]["replica"] = 2  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_service_monitor_has_the_fields_its_crd_requires_and_finds_the_service(rendered):
    """monitoring.coreos.com/v1 ServiceMonitor: spec.selector is required; each endpoint names a
    Service port by name. Checked by hand against the CRD's structure (its schema is not shipped
    offline), plus that it selects our Service and scrapes /metrics."""
    sm, svc = rendered["ServiceMonitor"], rendered["Service"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
    assert set(sm["spec"]) <= {"selector", "endpoints", "jobLabel", "namespaceSelector"}
    assert subset(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names and ep["path"] == "/metrics"
        assert re.fullmatch(r"\d+(ms|s|m)", ep["interval"])
    # The rules and the dashboard select job="snnet": the Operator names the job after the Service.
    assert svc["metadata"]["name"] == "snnet"


def test_selectors_and_names_refer_to_each_other(rendered):
    dep, svc, pdb, hpa = (rendered[k] for k in ("Deployment", "Service", "PodDisruptionBudget",
                                                 "HorizontalPodAutoscaler"))  # fmt: skip
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert subset(dep["spec"]["selector"]["matchLabels"], pod_labels)
    assert subset(svc["spec"]["selector"], pod_labels)
    assert subset(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    c = container(rendered)
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}
    assert (hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"]) == (
        "Deployment",
        dep["metadata"]["name"],
    )
    assert c["envFrom"][0]["configMapRef"]["name"] == rendered["ConfigMap"]["metadata"]["name"]


def test_probes_startup_and_termination(rendered):
    c = container(rendered)
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    # It gates liveness until the model is ready (/healthz answers as soon as the port
    # listens, so a start-up that hangs would never be restarted). Profiling a large model on
    # new hardware takes minutes: allow at least 10.
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # SIGKILL must not come before the preStop pause and the drain of accepted requests (up to
    # SNNET_MAX_QUEUE images; 30 s is ample for the queue limits configured here).
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 30
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]


def test_runs_as_the_images_non_root_user_with_a_writable_profile_cache(rendered):
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+)$", (ROOT / "Dockerfile").read_text(), re.M)[1]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(
        user
    )
    cache = re.search(r"SNNET_PROFILE_CACHE=(\S+)", (ROOT / "Dockerfile").read_text())[1]
    mounts = {m["mountPath"] for m in container(rendered)["volumeMounts"]}
    assert str(Path(cache).parent) in mounts


def test_settings_are_valid_service_settings(rendered):
    """Every key of the ConfigMap (and the env) is a setting of server/config.py, with a value
    that setting accepts."""
    data = dict(rendered["ConfigMap"]["data"])
    fields = {"metadata.namespace": "snnet"}  # what the downward API gives the pod
    for env in container(rendered)["env"]:
        if env["name"] == "POD_NAMESPACE":  # for the selector below
            assert fields[env["valueFrom"]["fieldRef"]["fieldPath"]]
            continue
        assert env["name"].startswith("SNNET_")
        value = env.get("value", "2")  # (SNNET_THREADS from the CPU request)
        data.setdefault(env["name"], value.replace("$(POD_NAMESPACE)", "snnet"))
    # The controller's fleet queries count this Deployment's pods: the job of the rules and
    # alerts, in the pod's own namespace.
    assert data["SNNET_PROMETHEUS_SELECTOR"] == 'job="snnet",namespace="snnet"'
    kwargs = {k.removeprefix("SNNET_").lower(): v for k, v in data.items()}
    assert set(kwargs) <= set(Settings.model_fields), set(kwargs) - set(Settings.model_fields)
    Settings(**kwargs)


def test_service_links_cannot_override_the_servers_settings(rendered):
    """Kubernetes' service links put ``<SERVICE>_PORT=tcp://...`` and more in every pod of the
    namespace; for a Service named snnet that is SNNET_PORT, which the server would refuse."""
    service = rendered["Service"]["metadata"]["name"]
    prefix = service.upper().replace("-", "_")
    if (prefix + "_").startswith("SNNET_") or prefix == "SNNET":
        assert rendered["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    with pytest.raises(ValueError):
        Settings(port="tcp://10.96.12.34:8000")  # what the links would set


def test_hpa_metrics_are_served_by_the_prometheus_adapter_rules():
    hpa = kustomize(OVERLAYS["base"])["HorizontalPodAutoscaler"]
    values = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    served = {}
    for rule in values["rules"]["custom"]:
        assert set(rule) == {"seriesQuery", "resources", "name", "metricsQuery"}
        # Per-pod metrics: the series must map to the pod and namespace resources.
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert (
            "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]
        )
        series = re.match(r"\w+", rule["seriesQuery"])[0]
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = rule
    for metric in hpa["spec"]["metrics"]:
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image():
    base, gpu = kustomize(OVERLAYS["base"]), kustomize(OVERLAYS["gpu"])
    assert "nvidia.com/gpu" not in container(base)["resources"].get("limits", {})
    assert container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container(gpu)["image"].endswith("-cuda")
    assert gpu["ConfigMap"]["data"]["SNNET_DEVICE"] == "cuda"
    # `auto` would start half the node's cores in HTTP processes (~0.5 GB each) in a pod that
    # requests 2 CPUs: the overlay sizes them to its request.
    cpus = float(container(gpu)["resources"]["requests"]["cpu"])
    assert 1 <= int(gpu["ConfigMap"]["data"]["SNNET_API_WORKERS"]) <= cpus
    # The overlay changes only what it says; everything else is the base.
    assert container(gpu)["readinessProbe"] == container(base)["readinessProbe"]
