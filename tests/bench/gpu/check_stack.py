"""Stops a GPU run unless the machine runs docker/stack/nvidia.txt: the NVIDIA image's stack
(vLLM, torch, transformers; the Python and Triton named in that file's comment and docs/images.md)."""
import importlib.metadata
import sys
from pathlib import Path

STACK = Path(__file__).resolve().parents[3] / "docker" / "stack" / "nvidia.txt"


def main() -> int:
    wanted = dict(line.split("==", 1) for line in STACK.read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    wanted["nvidia-pytriton"] = "0.7.0"  # Triton 2.51, as docker/install_stack.sh installs it
    wrong = []
    for name, version in wanted.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed.split("+")[0] != version:
            wrong.append(f"{name} {installed} (the image pins {version})")
    print(f"[stack] Python {sys.version.split()[0]}; " + ", ".join(f"{n}=={v}" for n, v in wanted.items())
          + (" — MISMATCH: " + "; ".join(wrong) if wrong else ": as docker/stack/nvidia.txt"))
    return 1 if wrong or sys.version_info[:2] != (3, 12) else 0


if __name__ == "__main__":
    sys.exit(main())
