"""docker/k8s/llm.yaml: valid for Kubernetes (its schemas, strict), consistent with itself,
and its readiness probe judged against the real server."""
from __future__ import annotations

import copy
import http.server
import json
import subprocess
import sys
import threading
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


@pytest.mark.server
def test_the_readiness_probe_passes_on_ok_and_fails_otherwise(server):
    command = container()["readinessProbe"]["exec"]["command"]
    assert command[0] == "python3"
    code = command[2].replace("127.0.0.1:8000", server.url.removeprefix("http://"))
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0  # the server says ok
    closed = code.replace(server.url.removeprefix("http://"), "127.0.0.1:9")  # nothing listens there
    assert subprocess.run([sys.executable, "-c", closed], timeout=30, capture_output=True).returncode != 0


@pytest.mark.parametrize("status, ready", [("warming", False), ("degraded", False), ("batch", True), ("ok", True)])
def test_the_readiness_probe_reads_the_health_status(status, ready):
    """Fault injection: a health endpoint that answers `status` (the shim's reply shape)."""
    body = json.dumps({"status": status}).encode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http.server.HTTPServer(("127.0.0.1", 0), Health) as fake:
        threading.Thread(target=fake.handle_request, daemon=True).start()
        code = container()["readinessProbe"]["exec"]["command"][2].replace(
            "127.0.0.1:8000", f"127.0.0.1:{fake.server_address[1]}")
        result = subprocess.run([sys.executable, "-c", code], timeout=30, capture_output=True)
    assert (result.returncode == 0) == ready
