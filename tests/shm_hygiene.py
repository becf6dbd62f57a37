"""Shared memory that killed test servers leave in /dev/shm, removed at the end of a session.

The fault tests `kill -9` engines and whole servers. A process killed that way cannot unlink
what it created: vLLM's `psm_*` segments, multiprocessing's `sem.mp-*` semaphores and the
Python backend's stub regions. Each CI run on a 2-core machine left 7-8 segments and 11-12
stub regions that stayed until reboot. Only names that appeared during this session, of those
three kinds, and that no live process maps or holds open, are removed.
"""
from __future__ import annotations

from pathlib import Path

from preprocess.engine.orphan_guard import shm_in_use

SHM = Path("/dev/shm")
KINDS = ("psm_", "sem.mp-", "triton_python_backend_shm_region_")


def shm_names(shm: Path = SHM) -> set[str]:
    try:
        return {entry.name for entry in shm.iterdir()}
    except OSError:  # no /dev/shm (not Linux)
        return set()


def names_in_use(shm: Path = SHM) -> set[str]:
    """Names under `shm` that a live process maps or holds open (the orphan guard's reading
    of /proc; processes this user may not read are skipped)."""
    return shm_in_use(shm)


def remove_orphans(before: set[str], shm: Path = SHM) -> list[str]:
    """Remove what appeared in `shm` since `before`, of the known kinds, that nothing uses now."""
    new = {name for name in shm_names(shm) - before if name.startswith(KINDS)}
    if not new:
        return []
    removed = []
    for name in sorted(new - names_in_use(shm)):
        try:
            (shm / name).unlink()
            removed.append(name)
        except OSError:
            pass
    return removed
