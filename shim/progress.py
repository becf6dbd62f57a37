"""Heartbeat lines for long work (model conversion, warm-up, benchmark, eval, soak), so a
person watching never faces more than a few seconds of silence."""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

DEFAULT_EVERY_S = 5.0


class Heartbeat:
    """`with Heartbeat(log, "warm-up"):` logs "warm-up: still running, 10 s" every few
    seconds (plus `status()` when given, e.g. "12/64 answered") and one line at the end."""

    def __init__(self, log: logging.Logger, what: str, every_s: float = DEFAULT_EVERY_S,
                 status: Callable[[], str] | None = None):
        self.log = log
        self.what = what
        self.every_s = every_s
        self.status = status
        self.started = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{what}", daemon=True)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def _line(self, state: str) -> str:
        extra = f", {self.status()}" if self.status is not None else ""
        return f"{self.what}: {state} {self.elapsed_s():.0f} s{extra}"

    def _beat(self) -> None:
        while not self._done.wait(self.every_s):
            self.log.info("%s", self._line("still running,"))

    def __enter__(self) -> "Heartbeat":
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._done.set()
        self._thread.join()
        self.log.info("%s", self._line("failed after" if exc_type else "done in"))
