"""The Docker images, checked without Docker (it does not run on the development machines):
hadolint, pinned bases, every copied path present in the build context, one entry.
The entry script itself is started outside Docker in tests/test_lifecycle.py."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*[!e]"))  # not the .dockerignore files


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def context_includes(dockerfile: Path, path: str) -> bool:
    """Whether <Dockerfile>.dockerignore (last matching rule wins) leaves `path` in the context."""
    rules = [r.strip() for r in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
             if r.strip() and not r.startswith("#")]
    included = True
    path = path.rstrip("/")
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        # A rule that names a folder covers everything inside it.
        if pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            included = negate
    return included


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.metax", "Dockerfile.nvidia"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_is_pinned_and_entry_is_the_serve_entry(dockerfile):
    steps = instructions(dockerfile)
    bases = [args for keyword, args in steps if keyword == "FROM"]
    assert len(bases) == 1 and re.search(r":[\w.-]+$", bases[0]) and not bases[0].endswith(":latest")
    assert ("ENTRYPOINT", '["docker/entrypoint.sh"]') in steps
    assert ("EXPOSE", "8000") in steps
    downloads = [args for keyword, args in steps if keyword == "RUN" and "shim.setup_model download" in args]
    assert downloads, "the model must be downloaded at build time"
    entry = (REPO / "docker" / "entrypoint.sh").read_text()
    assert "./build.sh serve" in entry


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    copied = []
    for keyword, args in instructions(dockerfile):
        if keyword == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            copied += parts[:-1]
    assert "model_repository/" in copied and "preprocess/" in copied and "shim/" in copied
    for source in copied:
        assert (REPO / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert context_includes(dockerfile, source), f"{source} is excluded by {dockerfile.name}.dockerignore"


def test_dockerignore_keeps_local_state_out():
    for dockerfile in DOCKERFILES:
        for local in (".venv", "model", "tests", ".git", ".gpu"):
            assert not context_includes(dockerfile, local), (dockerfile.name, local)


def test_build_sh_docker_rejects_an_unknown_flavour():
    result = subprocess.run([str(REPO / "build.sh"), "docker", "amd"], capture_output=True, text=True,
                            env={"LLM_PREINSTALLED": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "nvidia|metax" in result.stderr
