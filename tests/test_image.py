"""`./build.sh image-test` inside the suite: the CPU image of the product, built with podman
from docker/Dockerfile.nvidia's steps and served from a container (docker/image_test.sh,
tests/image_check.py). It needs root (apt, podman) and the network, as CI here has; where a
machine lacks them it fails rather than passing in silence."""
from __future__ import annotations

import subprocess

import pytest

from .conftest import ARTIFACTS, REPO

pytestmark = pytest.mark.alone  # its container takes a CPU share of its own: nothing runs beside it


def test_the_cpu_image_builds_and_serves_the_judge():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = ARTIFACTS / "image-test.log"
    with open(log, "w") as out:
        # Bounded by its own steps: apt and pip time out, the container must serve within 600 s.
        result = subprocess.run(["bash", str(REPO / "docker" / "image_test.sh")], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, timeout=3600)
    text = log.read_text(errors="replace")
    checks = [line for line in text.splitlines() if line.startswith("[image-check]")]
    assert result.returncode == 0 and "[image-check] passed" in text, "\n".join(checks) or text[-4000:]
    assert sum(line.startswith("[image-check] ok") for line in checks) >= 8, checks
