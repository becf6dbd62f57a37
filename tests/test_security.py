"""Limits, the admin token, loopback-only Triton, and the shim's own metrics."""
from __future__ import annotations

import ipaddress
import socket

import psutil
import pytest
from fastapi.testclient import TestClient

from preprocess.settings import load
from shim.app import create_app

from .conftest import http_json, scrape_metrics, warmed

pytestmark = pytest.mark.server


def raw_post(server, head: bytes, body: bytes = b"") -> bytes:
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def test_body_over_the_limit_is_a_413(server):
    # Declared length over the default SHIM_MAX_BODY_BYTES (8 MiB): refused before reading it.
    reply = raw_post(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 9437184\r\n\r\n", b'{"prompt": "')
    assert reply.startswith(b"HTTP/1.1 413") and b"SHIM_MAX_BODY_BYTES" in reply
    assert b"connection: close" in reply.lower()  # the unread body ends the connection
    # A chunked body (no length up front) is counted as it arrives.
    chunk = b"x" * (1024 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(9)) + b"0\r\n\r\n"
    reply = raw_post(server, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n", body)
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
    assert server.post("/predict", {"prompt": "still fine"})[0] == 200


def test_list_over_the_configured_maximum_is_refused(server):
    status, body = server.post("/predict", {"prompt": ["q"] * 4097})
    assert status == 413 and "4096" in body["error"]


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # gRPC shows ::ffff:127.0.0.1


def test_triton_ports_listen_on_loopback_only(server):
    ports = {int(server.env[k]) for k in ("TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT")}
    listening = [c for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port in ports]
    assert {c.laddr.port for c in listening} == ports
    assert all(loopback(c.laddr.ip) for c in listening), listening


def test_only_the_shim_may_listen_beyond_loopback(server):
    """Every listening socket of the whole process tree (shim, tritonserver, stubs, vLLM's
    engine): loopback only, except the shim's own port."""
    root = psutil.Process(server.process.pid)
    listening = []
    for process in [root, *root.children(recursive=True)]:
        try:
            listening += [(process.name(), c) for c in process.net_connections(kind="inet") if c.status == "LISTEN"]
        except psutil.NoSuchProcess:
            continue
    ports = {c.laddr.port for _, c in listening}
    assert int(server.env["PORT"]) in ports and int(server.env["TRITON_HTTP_PORT"]) in ports
    exposed = [(name, c.laddr) for name, c in listening
               if not loopback(c.laddr.ip) and c.laddr.port != int(server.env["PORT"])]
    assert exposed == []


def test_shim_metrics_count_routes_and_statuses(server):
    """The exact counts this test's own requests add (pytest runs tests one at a time)."""
    ok = "llm_shim_requests_total{method=POST,route=/predict,status=200}"
    bad = "llm_shim_requests_total{method=POST,route=/predict,status=422}"
    seconds = "llm_shim_request_seconds_count{method=POST,route=/predict}"
    before = scrape_metrics(server.url + "/metrics")
    assert server.post("/predict", {"prompt": "counted"})[0] == 200
    assert server.post("/predict", {"prompt": 1})[0] == 422
    assert http_json("GET", server.url + "/")[0] == 200
    after = scrape_metrics(server.url + "/metrics")  # counted before each response's last byte
    assert after[ok] - before.get(ok, 0) == 1
    assert after[bad] - before.get(bad, 0) == 1
    assert after[seconds] - before.get(seconds, 0) == 2


def test_admin_token_guards_system_prompt_updates_only(server, caplog):
    caplog.set_level("DEBUG")
    environ = {"TRITON_HTTP_PORT": server.env["TRITON_HTTP_PORT"], "WARMUP_NUM_SAMPLES": "0",
               "MODEL_DIR": server.env["MODEL_DIR"], "SHIM_ADMIN_TOKEN": "s3cret-admin"}
    with TestClient(create_app(load(environ), live_environ=environ)) as client:
        warmed(client)  # the app warms up through the ensemble first
        denied = client.post("/system_prompt", json={"system_prompt": "x"})
        # Refused before its body was read: the answer ends the connection (guards.CLOSE).
        assert denied.status_code == 401 and denied.headers["connection"] == "close"
        wrong = client.post("/system_prompt", json={"system_prompt": "x"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "s3cret" not in wrong.text
        right = client.post("/system_prompt", json={"system_prompt": "x"},
                            headers={"Authorization": "Bearer s3cret-admin"})
        assert right.status_code == 200
        assert client.get("/system_prompt").status_code == 200  # reading stays open
        assert client.post("/predict", json={"prompt": "open"}).status_code == 200  # judge routes stay open
        assert "s3cret" not in client.get("/info").text
    assert "s3cret" not in caplog.text and "Bearer nope" not in caplog.text  # nor in the shim's log


def test_control_characters_pass_and_bad_unicode_is_a_4xx(server):
    status, body = server.post("/predict", {"prompt": ["tab\tbell\u0007nul\u0000esc\u001b", "\u202e rtl"]})
    assert status == 200 and len(body["response"]) == 2
    # A lone surrogate is valid JSON but not text: refused by name, and the next request is served.
    status, body = server.post("/predict", b'{"prompt": ["ok", "bad \\ud800 half"]}')
    assert status == 400 and "prompt[1]" in body["error"] and "UTF-8" in body["error"]
    status, body = server.post("/predict", b'{"prompt": "\xff\xfe raw bytes"}')
    assert status == 400 and "invalid JSON" in body["error"]
    assert server.post("/predict", {"prompt": "after"})[0] == 200
