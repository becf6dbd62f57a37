"""Where the generator's engines run: replicas and their GPUs, from the environment.

One generator stub runs `DATA_PARALLEL_SIZE` independent engines (replicas), each on its
own group of `TENSOR_PARALLEL_SIZE` GPUs. Replica i gets the visible GPUs
[i*TP, (i+1)*TP). A replica's engine process is started with CUDA_VISIBLE_DEVICES set to
its group only (`devices_for`), so vLLM inside it sees GPUs 0..TP-1 as usual. With more
than one replica, each replica's AsyncLLM runs in a child process of the stub
(process_runner.py), spawned the same way, so each has a core for its output handling.

Why engines in one stub and not Triton instance groups: Triton 2.51 takes the instance
count only from config.pbtxt (a Python model's `auto_complete_config` cannot change it,
measured), so it could not follow the environment; and Triton picks the instance for each
request, so a 650-prompt list could not be split evenly. Why not vLLM's own data
parallelism: one dead engine core takes every rank down with it, while here the other
replicas keep serving while one is rebuilt.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterator, MutableMapping, Sequence

from ..envparse import SettingsError

AUTO = 0  # DATA_PARALLEL_SIZE=auto: as many replicas as the visible GPUs hold


@dataclass(frozen=True)
class Replica:
    index: int
    # CUDA_VISIBLE_DEVICES entries for this replica's engine (ids or UUIDs, as the process
    # sees them); empty on CPU.
    devices: tuple[str, ...] = ()
    # Positions of those devices among the process's visible GPUs: torch's cuda:N in this
    # process (the transformers fallback runs in-process).
    positions: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return str(self.index)

    def describe(self) -> dict:
        return {"replica": self.index, "gpus": list(self.devices)}


def visible_devices(listed: Sequence[str] | None, device_count: int) -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries (`listed`) when it is
    set, in its order, else 0..device_count-1."""
    if listed:
        return list(listed)[:device_count or None]
    return [str(i) for i in range(device_count)]


def plan_replicas(replicas: int, tensor_parallel: int, visible: Sequence[str], accelerator: bool) -> list[Replica]:
    """The replicas and their GPUs, or SettingsError with one line saying what does not fit.

    On CPU there are no GPUs to share: `replicas` engines (auto: 1) share the host."""
    if not accelerator:
        return [Replica(i) for i in range(replicas or 1)]
    count = len(visible)
    shown = f"{count} visible GPU{'s' if count != 1 else ''} ({','.join(visible) or 'none'})"
    if tensor_parallel > count:
        raise SettingsError(f"TENSOR_PARALLEL_SIZE={tensor_parallel} needs {tensor_parallel} GPUs; "
                            f"there are {shown}")
    if count % tensor_parallel:
        raise SettingsError(f"TENSOR_PARALLEL_SIZE={tensor_parallel} does not divide the {shown}; "
                            "set CUDA_VISIBLE_DEVICES to the GPUs to use")
    wanted = replicas or count // tensor_parallel
    if wanted * tensor_parallel > count:
        raise SettingsError(f"DATA_PARALLEL_SIZE={wanted} x TENSOR_PARALLEL_SIZE={tensor_parallel} needs "
                            f"{wanted * tensor_parallel} GPUs; there are {shown}")
    return [Replica(i, tuple(visible[i * tensor_parallel:(i + 1) * tensor_parallel]),
                    tuple(range(i * tensor_parallel, (i + 1) * tensor_parallel)))
            for i in range(wanted)]


def process_frontends(frontend: str, replicas: int) -> bool:
    """ENGINE_FRONTEND: each replica's AsyncLLM in a child process (`process`), in the stub
    (`thread`), or `auto`: a process each when there is more than one replica, whose
    front ends would otherwise share the stub's one core; one replica gains nothing from it
    (docs/architecture.md, "Replicas and tensor parallelism")."""
    return frontend == "process" or (frontend == "auto" and replicas > 1)


def split_evenly(count: int, loads: Sequence[int]) -> list[int]:
    """How many of `count` new prompts each replica takes, so that the loads (prompts
    in flight per replica) end as level as they can: water-filling, lowest first. Equal
    loads give shares that differ by at most one."""
    shares = [0] * len(loads)
    if not loads:
        return shares
    levels = list(loads)
    for _ in range(count):  # count <= max_batch_size (512): a direct loop is cheap and plain
        lowest = min(range(len(levels)), key=levels.__getitem__)
        shares[lowest] += 1
        levels[lowest] += 1
    return shares


def deal_by_answer_length(limits: Sequence[int], shares: Sequence[int]) -> list[list[int]]:
    """Which prompts each replica answers: `shares[k]` of them for replica k, handed out
    from the largest answer limit (max_tokens) down, each to the replica whose share is
    least filled so far. So every replica gets its part of the long answers: a split request
    is done only when its slowest part is, and the judge's list may group its code
    questions (the long answers) together, which a split in the list's order would hand to
    one replica. Each part lists its prompts' positions in the request's order."""
    if sum(shares) != len(limits) or min(shares, default=0) < 0:
        raise ValueError(f"shares {list(shares)} do not split {len(limits)} prompts")
    parts: list[list[int]] = [[] for _ in shares]
    for position in sorted(range(len(limits)), key=lambda i: -limits[i]):  # stable: ties keep their order
        open_parts = [k for k in range(len(shares)) if len(parts[k]) < shares[k]]
        parts[min(open_parts, key=lambda k: len(parts[k]) / shares[k])].append(position)
    return [sorted(part) for part in parts]


_environment_lock = threading.Lock()


@contextlib.contextmanager
def devices_for(replica: Replica, environ: MutableMapping[str, str]) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES of `environ` (the process environment) narrowed to the replica's
    GPUs while its engine is built.

    vLLM's engine core is a spawned process that inherits this process's environment at
    spawn time, so narrowing the variable while the engine is built is what places it.
    The variable is process-wide: the lock makes in-process engine builds one at a time (a
    child front end holds it only while it is spawned), and the old value comes back
    afterwards. Nothing is changed on CPU (no devices)."""
    if not replica.devices:
        yield
        return
    with _environment_lock:
        before = environ.get("CUDA_VISIBLE_DEVICES")
        environ["CUDA_VISIBLE_DEVICES"] = ",".join(replica.devices)
        try:
            yield
        finally:
            if before is None:
                environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                environ["CUDA_VISIBLE_DEVICES"] = before
