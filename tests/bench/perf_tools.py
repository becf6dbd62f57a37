"""perf_analyzer from the tritonclient 2.51 wheel, ready to run (the perf_analyzer lines of docs/api.md)."""
from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INPUT_DATA = REPO / "tests" / "bench" / "perf_data" / "llm_inputs.json"


def perf_analyzer_binary() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def perf_analyzer_env() -> dict[str, str]:
    """It links libcudart.so.12 even on CPU: the nvidia-cuda-runtime-cu12 wheel provides it."""
    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{cudart}:{env.get('LD_LIBRARY_PATH', '')}"
    return env


def perf_analyzer_command(url: str, concurrency: str, model: str = "llm", extra: list[str] | None = None) -> list[str]:
    return [str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", "http", "--input-data", str(INPUT_DATA),
            "--concurrency-range", concurrency, *(extra or [])]
