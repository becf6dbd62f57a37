"""A second server: the transformers backend through Triton, and Ctrl-C leaving nothing behind."""
from __future__ import annotations

import signal
import time

import psutil
import pytest

from .conftest import server_env, start_server

pytestmark = pytest.mark.server


def test_transformers_backend_serves_and_ctrl_c_stops_everything(tiny_model):
    server = start_server(server_env(tiny_model, USE_VLLM="false"), "server-transformers.log")
    try:
        assert server.get("/info")[1]["backend"] == "transformers"
        status, body = server.post("/predict", {"prompt": ["hello", "世界"], "max_new_tokens": 3})
        assert status == 200 and len(body["response"]) == 2
        tree = psutil.Process(server.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "tritonserver" in names and "triton_python_backend_stub" in names
    finally:
        server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        server.process.wait(60)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
