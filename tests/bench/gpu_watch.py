"""What the GPUs did during a benchmark: nvidia-smi samples every second, and which
processes hold them (which shows that no engine outlives its phase)."""
from __future__ import annotations

import subprocess
import threading
import time

GPU_QUERY = "index,memory.used,utilization.gpu,clocks.sm,temperature.gpu"


def parse_gpu_samples(text: str, when: float) -> list[dict]:
    """One sample per GPU from `nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`
    (one line per GPU)."""
    samples = []
    for line in text.strip().splitlines():
        index, mem, util, sm, temp = (field.strip() for field in line.split(","))
        samples.append({"t": when, "gpu": int(index), "mem_mib": float(mem), "util": float(util),
                        "sm_mhz": float(sm), "temp_c": float(temp)})
    return samples


class GpuSampler:
    """nvidia-smi every second, every GPU: memory, utilisation, SM clock, temperature."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        query = ["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.samples.extend(parse_gpu_samples(out, time.time()))
            except (OSError, subprocess.TimeoutExpired, ValueError):  # a missed sample is only a gap
                continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def gpu_processes() -> str:
    """Which processes hold the GPU: shows that no engine outlives its phase."""
    try:
        return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
