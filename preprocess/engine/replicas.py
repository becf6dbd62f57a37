"""One engine replica's lifecycle, and one request's prompts spread over several replicas.

Thread model: `submit` runs on the stub's main thread; completions arrive on each engine's
own thread; the service's watchdog thread rebuilds dead engines. The counters below are
touched from all three, under the replica's lock.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from .generation import BatchHandle, Completion, GenerationResult, Runner
from .placement import Replica

log = logging.getLogger("generator")


class EngineReplica:
    """An engine on its GPU group. When its engine dies (`notice_death`), `rebuild_if_due`
    brings up a new one, backing off from `retry_first_s`, doubling, to `retry_max_s`, so
    a rebuild that keeps failing (out of memory, FORCE_VLLM) never spins; the other
    replicas keep serving meanwhile."""

    def __init__(self, placement: Replica, start: Callable[[Replica], Runner],
                 retry_first_s: float = 0.5, retry_max_s: float = 30.0):
        self.placement = placement
        self._start = start
        self.retry_first_s = retry_first_s
        self.retry_max_s = retry_max_s
        self.runner: Runner = start(placement)
        self.restarting = False
        self.restarts = 0
        self.rebuild_delays: list[float] = []  # the back-off chosen after each failed rebuild
        self._delay = retry_first_s
        self._next_attempt = 0.0
        self._lock = threading.Lock()
        self.in_flight = 0  # prompts submitted and not yet answered: what the split levels
        self.engine_generation = 0  # +1 per rebuild: answers of a dead engine no longer count

    @property
    def index(self) -> int:
        return self.placement.index

    @property
    def ready(self) -> bool:
        return not self.restarting and self.runner.healthy

    def add_in_flight(self, count: int, generation: int) -> None:
        """`count` prompts more (or fewer) in flight on the engine of `generation`."""
        with self._lock:
            if generation == self.engine_generation:
                self.in_flight += count

    def notice_death(self) -> bool:
        """True when the engine has just been found dead: it is shut down and marked
        restarting (publish that before the rebuild, which takes tens of seconds)."""
        if self.restarting or self.runner.healthy:
            return False
        self.restarting = True
        log.error("replica %d: the %s engine died; starting a new one", self.index, self.runner.backend)
        try:
            self.runner.shutdown(timeout_s=5)
        except Exception as exc:
            log.warning("replica %d: shutdown of the dead engine: %s", self.index, exc)
        return True

    def rebuild_if_due(self, now: float) -> bool:
        """One rebuild attempt when one is due; True when the replica serves again."""
        if not self.restarting or now < self._next_attempt:
            return False
        started = time.monotonic()
        try:
            self.runner = self._start(self.placement)
        except Exception as exc:
            log.error("replica %d: engine restart failed: %s; next attempt in %.1f s", self.index, exc, self._delay)
            self.rebuild_delays.append(self._delay)
            self._next_attempt = time.monotonic() + self._delay
            self._delay = min(self.retry_max_s, self._delay * 2)
            return False
        with self._lock:  # what the dead engine held is gone with it, answered or not
            self.in_flight = 0
            self.engine_generation += 1
        self.restarts += 1
        self.restarting = False
        self._delay = self.retry_first_s
        self._next_attempt = 0.0
        log.info("replica %d: engine back after %.1f s", self.index, time.monotonic() - started)
        return True

    def info(self) -> dict:
        runner = self.runner
        return {
            **self.placement.describe(),
            "ready": self.ready,
            "backend": runner.backend,
            "engine_pid": getattr(runner, "engine_pid", None),
            "frontend_pid": getattr(runner, "frontend_pid", None),
            "restarts": self.restarts,
            "in_flight": self.in_flight,
        }


class SplitRequest:
    """One Triton request's prompts, answered by several replicas: part k answers the
    prompts at `positions[k]`, and the parts' results are put back in the request's order;
    or the first failure answers the whole request (the other parts are cancelled).
    `on_done` is called exactly once."""

    def __init__(self, positions: Sequence[Sequence[int]], on_done: Completion, cancel_parts: Callable[[], None]):
        self._positions = [list(p) for p in positions]
        self._results: list[list[GenerationResult] | None] = [None] * len(self._positions)
        self._remaining = len(self._positions)
        self._answered = False
        self._lock = threading.Lock()
        self._on_done = on_done
        self._cancel_parts = cancel_parts

    @property
    def answered(self) -> bool:
        return self._answered

    def part_done(self, part: int, outcome: list[GenerationResult] | BaseException) -> None:
        with self._lock:
            if self._answered:
                return
            if isinstance(outcome, BaseException):
                self._answered = True
                answer: list[GenerationResult] | BaseException | None = outcome
            else:
                self._results[part] = outcome
                self._remaining -= 1
                answer = None
                if self._remaining == 0:
                    self._answered = True
                    answer = self._in_request_order()
        if answer is None:
            return
        if isinstance(answer, BaseException):
            self._cancel_parts()
        self._on_done(answer)

    def _in_request_order(self) -> list[GenerationResult] | BaseException:
        """Every part's results at its prompts' positions; a part that answered a different
        number of prompts than it was given fails the request (never a shorter list)."""
        answer: list[GenerationResult | None] = [None] * sum(len(p) for p in self._positions)
        for positions, results in zip(self._positions, self._results):
            if results is None or len(results) != len(positions):
                return RuntimeError(f"an engine answered {0 if results is None else len(results)} "
                                    f"of the {len(positions)} prompts it was given")
            for position, result in zip(positions, results):
                answer[position] = result
        return answer  # every position is filled: the parts partition the request


def joined_handle(parts: Sequence[tuple[EngineReplica, BatchHandle]]) -> BatchHandle:
    """The handle the adapter keeps for cancellation: the parts' ids joined, and the parts."""
    return BatchHandle("+".join(h.batch_id for _, h in parts), parts=list(parts))
