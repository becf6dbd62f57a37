"""Process set-up shared by the three Triton models (runs inside the Python-backend stub)."""
from __future__ import annotations

import locale
import logging
import shutil
import sys
from pathlib import Path


def python_executable() -> str:
    """This interpreter; inside a Triton stub, whose sys.executable is not Python, the
    python3 on PATH (the venv's, which is how the stub finds its environment)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


def prepare_stub_process(component: str) -> logging.Logger:
    """UTF-8 locale and one prefixed log stream for a model's stub process.

    The stub starts with an ASCII locale, and torch/vLLM imports then fail with
    UnicodeDecodeError; C.UTF-8 must be set before they are imported.
    """
    try:
        locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
    except locale.Error:
        pass
    root = logging.getLogger()
    if not any(getattr(h, "_llm_stub", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[{component}] %(levelname)s %(name)s: %(message)s"))
        handler._llm_stub = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logging.getLogger(component)
