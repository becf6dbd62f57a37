"""The run-time protocol between the generator (inside tritonserver) and the shim, both halves.

Both run on one host under `./build.sh serve`, which sets LLM_RUNTIME_DIR:
- `generator.json`: the generator's state (backend, engine arguments, scheduler, ready or
  rebuilding), written atomically by the generator, read by the shim for health and /info;
- `cancelled/<request id>`: empty files the shim drops for requests whose HTTP client went
  away (Triton 2.51's HTTP frontend does not pass a disconnect on to the model); the
  generator takes them and aborts those requests in vLLM. Markers nobody takes (the request
  had already been answered) are swept after `CancelMarkers.max_age_s`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple


class GeneratorStatus(NamedTuple):
    up: bool
    replicas: tuple[int, int] | None
    fallback: str | None


class GeneratorState:
    def __init__(self, runtime: Path | None):
        self.path = runtime / "generator.json" if runtime else None

    def publish(self, state: dict[str, Any]) -> None:
        """Atomic replace: a reader sees the old state or the new one, never half."""
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, default=str))
        tmp.replace(self.path)

    def read(self) -> dict[str, Any] | None:
        if self.path is None:
            return None
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def status(self) -> "GeneratorStatus":
        """From one read of the state file: whether the generator answers requests (False
        while every replica is rebuilding its engine; with no state, Triton's own readiness
        decides), (replicas serving, replicas in all) or None without replicas, and why
        transformers serves where vLLM was asked for (None when it does not)."""
        state = self.read()
        if state is None:
            return GeneratorStatus(True, None, None)
        up = bool(state.get("serving", state.get("ready", True)))
        replicas = state.get("replicas") or []
        counts = (sum(1 for r in replicas if r.get("ready")), len(replicas)) if replicas else None
        return GeneratorStatus(up, counts, state.get("engine_fallback"))

    def describe(self) -> str:
        state = self.read()
        return "loading" if not state else ("ready" if state.get("ready") else "loading engine")


class CancelMarkers:
    max_age_s = 60.0

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def valid(request_id: str) -> bool:
        """Only ids the shim makes (hex, dashes): a marker name can never leave the folder."""
        return bool(request_id) and len(request_id) <= 128 and request_id.replace("-", "").isalnum()

    def mark(self, request_id: str) -> None:
        if self.folder is not None and self.valid(request_id):
            (self.folder / request_id).touch()

    def take(self, request_id: str) -> bool:
        if self.folder is None or not self.valid(request_id):
            return False
        try:
            (self.folder / request_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def sweep(self, now: float | None = None) -> int:
        """Remove markers older than max_age_s (their request was answered before the mark)."""
        if self.folder is None:
            return 0
        now = time.time() if now is None else now
        removed = 0
        for marker in self.folder.iterdir():
            try:
                if now - marker.stat().st_mtime > self.max_age_s:
                    marker.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class Rarely:
    """A yes/no question that is costly to ask (Triton's `is_cancelled` is a round trip
    from the stub to the server), asked at most once per `every_s`: the first call asks,
    calls in between say no, and once the answer is yes it stays yes without asking."""

    def __init__(self, ask: Callable[[], bool], every_s: float, clock: Callable[[], float] = time.monotonic):
        self.ask = ask
        self.every_s = every_s
        self.clock = clock
        self._next_s = float("-inf")
        self._yes = False

    def __call__(self) -> bool:
        if not self._yes and (now := self.clock()) >= self._next_s:
            self._next_s = now + self.every_s
            self._yes = bool(self.ask())
        return self._yes
