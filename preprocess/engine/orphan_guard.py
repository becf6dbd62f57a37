"""Engines die with their generator, however the generator dies.

vLLM starts its engine core (and on GPUs its workers) as processes of their own. When the
generator's stub is killed hard (tritonserver SIGKILLed, or stopped past its exit timeout),
they are re-parented and keep running, with their memory: on a GPU the next start cannot
allocate, and the fallback chain ends at transformers. Measured on CPU: after `kill -9` of a
plain tritonserver, `VLLM::EngineCore` and `VLLM::Worker` were alive 60 s later.

One guard process per generator, started by `start_guard`: every second it records the
generator's descendants (pid and start time, in ticks since boot) and the /dev/shm
segments they and the generator map. Once the generator is gone, or its server is (a stub
whose server died can hang in its own teardown and never exit: seen once in CI, a stub
alive 60 s after `kill -9` of tritonserver), it sends the descendants, and the generator
if it is still there 5 s later, SIGTERM (vLLM's own shutdown) and SIGKILL to whatever is
alive 5 s after that, waits for them to be gone, then removes the recorded segments that
no live process maps (a killed process cannot unlink its own). A process is signalled
only if its start time is the recorded one, so a pid the system has since reused is left
alone. The guard runs in a session of its own, so
a group kill of the server does not take it before it has done its work; it exits once
that work is done.

    python3 orphan_guard.py GENERATOR_PID      (run by path: it imports psutil only)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SHM = Path("/dev/shm")

POLL_S = 1.0
GRACE_S = 5.0


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat, field 22), or
    None when it is gone. Not psutil's create_time: that adds the boot time, which the
    kernel reports in whole seconds and a clock adjustment can step, and one step would
    make the guard take a live generator (or its server) for gone and end it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(process: psutil.Process, own_pid: int) -> dict[int, int]:
    found = {}
    try:
        children = process.children(recursive=True)
    except psutil.Error:
        return found
    for child in children:
        started = start_ticks(child.pid)
        if child.pid != own_pid and started is not None:
            found[child.pid] = started
    return found


def still_the_same(pid: int, started: int) -> psutil.Process | None:
    if start_ticks(pid) != started:
        return None
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def end(recorded: dict[int, int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM, then SIGKILL after `grace_s`, to the recorded processes still alive. The pids signalled."""
    alive = [p for pid, started in recorded.items() if (p := still_the_same(pid, started)) is not None]
    for process in alive:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for process in left:
        try:
            process.kill()
        except psutil.Error:
            pass
    # Until they are gone: a process killed a moment ago may still map its segments, and
    # remove_unused would leave them (CI saw a stub's region left so).
    psutil.wait_procs(left, timeout=grace_s)
    return [p.pid for p in alive]


def shm_mapped(pid: int, shm: Path = SHM) -> set[str]:
    """Names under `shm` that process `pid` maps or holds open."""
    prefix, used = f"{shm}/", set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
            if len(fields) == 6 and fields[5].startswith(prefix):
                used.add(fields[5][len(prefix):].removesuffix(" (deleted)"))
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith(prefix):
                used.add(target[len(prefix):])
    except OSError:  # gone meanwhile, or not ours to read
        pass
    return used


def shm_in_use(shm: Path = SHM) -> set[str]:
    """Names under `shm` that any live process maps or holds open."""
    used: set[str] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            used |= shm_mapped(int(entry.name), shm)
    return used


def remove_unused(names: set[str], shm: Path = SHM) -> list[str]:
    removed = []
    for name in sorted(names - shm_in_use(shm)):
        try:
            (shm / name).unlink()
            removed.append(name)
        except OSError:  # already gone
            pass
    return removed


def running(pid: int, started: int | None) -> bool:
    process = still_the_same(pid, started)
    try:
        return process is not None and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(generator_pid: int, poll_s: float = POLL_S) -> tuple[list[int], list[str]]:
    """Until the generator or its server (its parent) is gone; then (pids signalled, segments removed)."""
    try:
        generator = psutil.Process(generator_pid)
        server = generator.parent()
    except psutil.Error:
        return [], []
    born = start_ticks(generator_pid)
    server_born = start_ticks(server.pid) if server is not None else None
    if born is None:
        return [], []
    own = psutil.Process().pid
    recorded: dict[int, int] = {}
    segments: set[str] = set()
    while running(generator_pid, born) and (server is None or running(server.pid, server_born)):
        recorded.update(descendants(generator, own))
        # Forget the processes that ended on their own (an engine rebuilt after a death).
        recorded = {pid: started for pid, started in recorded.items() if still_the_same(pid, started)}
        for pid in (generator_pid, *recorded):
            segments |= shm_mapped(pid)
        time.sleep(poll_s)
    # Its server is gone: the stub exits by itself (and cleans up after itself) within a
    # moment; one still there after GRACE_S hangs, and is ended with its engine.
    deadline = time.monotonic() + GRACE_S
    while running(generator_pid, born) and time.monotonic() < deadline:
        time.sleep(0.1)
    if running(generator_pid, born):
        recorded[generator_pid] = born
    ended = end(recorded)
    return ended, remove_unused(segments)


def start_guard(generator_pid: int, python: str) -> subprocess.Popen:
    return subprocess.Popen([python, __file__, str(generator_pid)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
