"""Bad input, generated: schemathesis against the shim's own OpenAPI document.

A bounded run (coverage + fuzzing phases, 10 examples per operation, fixed seed) over every
route except /metrics; the only check is the one that matters here: no 5xx. A request that
hangs past --request-timeout is an error too, so "no hang" is checked as well.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.server

MAX_EXAMPLES = 10


def test_generated_requests_get_no_server_error_and_no_hang(server):
    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    original = server.get("/system_prompt")[1]["system_prompt"]
    report = ARTIFACTS / "schemathesis.xml"
    command = [schemathesis, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
               "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "60", "--seed", "7", "--workers", "2",
               "--no-color", "--generation-database", "none", "--exclude-path", "/metrics",
               "--report", "junit", "--report-junit-path", str(report)]
    try:
        # cwd: its caches (.schemathesis, .hypothesis) go with the other test artifacts
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ARTIFACTS)
    finally:
        server.post("/system_prompt", {"system_prompt": original})  # fuzzing changes it
    (ARTIFACTS / "schemathesis.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "generated" in run.stdout
    status, body = server.post("/predict", {"prompt": "still serving?", "max_new_tokens": 2})
    assert status == 200 and isinstance(body["response"], str)
