"""An overlay environment that carries tests/faults/sitecustomize.py into Triton's stubs.

The stubs run isolated (`sys.flags.isolated` is 1, and the processes they spawn inherit
`-I`), so PYTHONPATH does not reach them. They find their environment through the
`python3` first on PATH, and an isolated interpreter still imports `sitecustomize` from its
own site-packages. The overlay is a venv without pip whose site-packages holds a link to the
fault module and a .pth that adds the project's venv (its own .pth files, the editable
install among them, included): with its bin first on PATH, every stub and engine process
runs the project's code with the faults armed. Nothing here is used by a shipped server.
"""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

FAULTS = Path(__file__).resolve().parent


def fault_overlay(root: Path) -> Path:
    """Creates the overlay under `root`; returns its bin folder (put it first on PATH)."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_packages = root / "lib" / version / "site-packages"
    project = sysconfig.get_paths()["purelib"]
    (site_packages / "project-venv.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    (site_packages / "sitecustomize.py").symlink_to(FAULTS / "sitecustomize.py")
    return root / "bin"
