"""docker/k8s/llm.yaml: valid for Kubernetes (its schemas, strict), consistent with itself,
and its readiness probe judged against the real server."""
from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from preprocess import settings as cfg

MANIFEST = Path(__file__).resolve().parents[1] / "docker" / "k8s" / "llm.yaml"
KUBERNETES_VERSION = "1.33"


def documents() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text())}


def container() -> dict:
    return documents()[("Deployment", "llm")]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("key", sorted(documents()))
def test_every_object_is_valid_for_kubernetes(key):
    kubernetes_validate.validate(documents()[key], KUBERNETES_VERSION, strict=True)


def test_the_schema_check_can_fail():
    broken = copy.deepcopy(documents()[("Deployment", "llm")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_only_the_shim_port_is_served_and_both_metrics_are_scraped():
    docs = documents()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    service = docs[("Service", "llm")]["spec"]
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(8000, "http")] and ports["http"] == 8000
    pod = docs[("Deployment", "llm")]["spec"]["template"]["metadata"]["annotations"]
    assert (pod["prometheus.io/scrape"], int(pod["prometheus.io/port"]), pod["prometheus.io/path"]) == \
        ("true", ports["http"], "/metrics")
    metrics = docs[("Service", "llm-triton-metrics")]
    assert metrics["spec"]["clusterIP"] == "None"  # headless: for discovery, not traffic
    assert int(metrics["metadata"]["annotations"]["prometheus.io/port"]) == ports["triton-metrics"] == \
        cfg.ShimSettings().triton_metrics_port
    for probe in ("startupProbe", "livenessProbe"):
        assert container()[probe]["httpGet"]["port"] in ports
    assert container()["resources"]["limits"]["nvidia.com/gpu"] == container()["resources"]["requests"]["nvidia.com/gpu"]
    hpa = docs[("HorizontalPodAutoscaler", "llm")]["spec"]["scaleTargetRef"]
    assert (hpa["kind"], hpa["name"]) == ("Deployment", "llm")


def test_the_environment_is_read_by_the_product():
    """Each variable is one the settings parse, and the values parse."""
    env = {e["name"]: e["value"] for e in container()["env"] if "value" in e}
    assert set(env) <= set(cfg.PUBLIC_VARIABLES)
    settings = cfg.load(env, cpu_only=True)
    assert settings.engine.data_parallel_size == 0 and settings.shim.triton_metrics_host == "0.0.0.0"


def test_shutdown_settings_agree_with_the_drain():
    """The grace period covers the preStop pause, the shim's drain and tritonserver's stop."""
    pod = documents()[("Deployment", "llm")]["spec"]
    env = {e["name"]: e["value"] for e in container()["env"] if "value" in e}
    drain_s = cfg.load(env, cpu_only=True).shim.drain_s
    pause = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["template"]["spec"]["terminationGracePeriodSeconds"] >= pause + drain_s + 20
    assert pod["strategy"] == {"type": "Recreate"}
    secret = next(e for e in container()["env"] if e["name"] == "SHIM_ADMIN_TOKEN")
    assert secret["valueFrom"]["secretKeyRef"]["optional"] is False
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.server
def test_every_probe_path_is_served_and_says_ready_only_when_serving(server):
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container()[probe]["httpGet"]["path"]
        status, body = server.get(path)
        assert status == 200 and body["status"] in ("ok", "batch", "alive"), (probe, path, body)
    assert server.get("/health/ready")[1] == server.get("/")[1]


def test_the_autoscaler_reads_the_waiting_queue_and_the_pod_monitor_scrapes_both_ports():
    hpa = documents()[("HorizontalPodAutoscaler", "llm")]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert hpa == "vllm_num_requests_waiting"  # vllm:num_requests_waiting, renamed by the adapter rule
    assert "vllm:num_requests_waiting" in MANIFEST.read_text()
    monitor = yaml.safe_load((MANIFEST.parent / "podmonitor.yaml").read_text())
    ports = {p["name"] for p in container()["ports"]}
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped == {"http", "triton-metrics"} and scraped <= ports, (scraped, ports)
    labels = documents()[("Deployment", "llm")]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
