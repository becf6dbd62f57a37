"""CPU time of each process of a server's tree over a window, by what the process is: which
process a path keeps busy (1.0 = one core for the whole window; a process bound by Python's
GIL cannot go much past 1.0)."""
from __future__ import annotations

import time

import psutil


def stub_pids(root: int | None = None) -> dict[str, int]:
    """The Python-backend stub of each Triton model, by model name (from its command line);
    with `root`, only that process's descendants (one product of several)."""
    processes = psutil.Process(root).children(recursive=True) if root else psutil.process_iter()
    found = {}
    for process in processes:
        try:
            line = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "triton_python_backend_stub" in line:
            for model in ("preprocess", "generator", "generator_stream", "postprocess"):
                if f"/{model}/1/model.py" in line:
                    found[model] = process.pid
    return found


def roles(root: int, root_role: str = "shim") -> dict[int, str]:
    """Every process under `root` by what it is: the root, each model's stub, or its process
    name (tritonserver, vLLM's engine processes)."""
    stubs = {pid: f"stub {model}" for model, pid in stub_pids(root).items()}
    return {root: root_role} | {child.pid: stubs.get(child.pid, child.name())
                                for child in psutil.Process(root).children(recursive=True)}


def cpu_seconds(pid: int) -> float:
    """User and system time of the process, all its threads."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class CpuWindow:
    """CPU seconds per role of the processes under `root` from construction to `spent()`."""

    def __init__(self, root: int, root_role: str = "shim"):
        self.named = roles(root, root_role)
        self.before = {}
        for pid in self.named:
            try:
                self.before[pid] = cpu_seconds(pid)
            except psutil.Error:
                continue
        self.started = time.perf_counter()

    def spent(self) -> tuple[dict[str, float], float]:
        """(CPU seconds per role, wall seconds) since construction; a process that ended in
        the window is left out."""
        seconds, spent = time.perf_counter() - self.started, {}
        for pid, before in self.before.items():
            try:
                spent[self.named[pid]] = spent.get(self.named[pid], 0.0) + cpu_seconds(pid) - before
            except psutil.Error:
                continue
        return spent, seconds

    def core_shares(self) -> dict[str, float]:
        """Each role's CPU seconds over the wall seconds of the window, largest first."""
        spent, seconds = self.spent()
        return {role: round(cpu / seconds, 3) for role, cpu in sorted(spent.items(), key=lambda kv: -kv[1])}
