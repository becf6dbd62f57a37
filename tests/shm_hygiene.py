"""Shared memory that killed test servers leave in /dev/shm, removed at the end of a session.

The fault tests `kill -9` engines and whole servers. A process killed that way cannot unlink
what it created: vLLM's `psm_*` segments, multiprocessing's `sem.mp-*` semaphores and the
Python backend's stub regions. Each CI run on a 2-core machine left 7-8 segments and 11-12
stub regions that stayed until reboot. Only names that appeared during this session, of those
three kinds, and that no live process maps or holds open, are removed.
"""
from __future__ import annotations

import os
from pathlib import Path

SHM = Path("/dev/shm")
KINDS = ("psm_", "sem.mp-", "triton_python_backend_shm_region_")


def shm_names(shm: Path = SHM) -> set[str]:
    try:
        return {entry.name for entry in shm.iterdir()}
    except OSError:  # no /dev/shm (not Linux)
        return set()


def names_in_use(shm: Path = SHM) -> set[str]:
    """Names under `shm` that a live process maps or holds open (from /proc; processes this
    user may not read are skipped, so run as the user who ran the servers)."""
    prefix, used = f"{shm}/", set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith(prefix):
                    used.add(path[len(prefix):].removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target[len(prefix):])
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return used


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
