"""A second server: the transformers backend through Triton, started by the Docker images'
entry script (outside Docker), and Ctrl-C leaving nothing behind."""
from __future__ import annotations

import signal
import sys

import psutil
import pytest

from .conftest import REPO, server_env, start_server

pytestmark = pytest.mark.server


def test_entry_script_serves_transformers_backend_and_ctrl_c_stops_everything(tiny_model):
    # The images run docker/entrypoint.sh on their own Python; here that Python is the venv's.
    env = server_env(tiny_model, USE_VLLM="false", PYTHON=sys.executable)
    server = start_server(env, "server-transformers.log", command=[str(REPO / "docker" / "entrypoint.sh")])
    try:
        info = server.get("/info")[1]
        assert info["backend"] == "transformers"
        assert info["batch_mode"] is True  # docker/run_model.sh, the entry's default preset, applied
        status, body = server.post("/predict", {"prompt": ["hello", "世界"], "max_new_tokens": 3})
        assert status == 200 and len(body["response"]) == 2
        tree = psutil.Process(server.process.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "tritonserver" in names and "triton_python_backend_stub" in names
    finally:
        server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        server.process.wait(60)
    gone, alive = psutil.wait_procs(tree, timeout=60)  # a bound: returns as soon as all are gone
    assert not alive, [p.cmdline() for p in alive]
