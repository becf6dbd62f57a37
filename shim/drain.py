"""A drain on shutdown: the first SIGTERM (or Ctrl-C) takes the server out of rotation and
lets the requests in flight finish, within SHIM_DRAIN_S, before it stops.

While draining, readiness (`/health/ready`) is 503 at once, `GET /` says `draining`, and a
new request gets 503 with Retry-After (another replica can take it); requests already in
flight, a judge batch or a stream, are answered. When none is left, or SHIM_DRAIN_S has
passed, uvicorn's own shutdown runs. A second signal stops at once.
"""
from __future__ import annotations

import asyncio
import logging
import time

import uvicorn

log = logging.getLogger("shim.drain")

RETRY_AFTER_S = 5


class Drain:
    """Requests in flight, and whether the server is draining. Touched only on the event
    loop (the guards and the drain task), so it needs no lock."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0

    def begin(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether every request in flight was answered within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return not self.in_flight


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on its first exit signal instead of stopping."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_s: float):
        super().__init__(config)
        self.drain = drain
        self.drain_s = drain_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal (or one before serving): stop now
            return
        self.drain.begin()
        log.info("signal %s: draining; %d request(s) in flight, up to %.0f s (SHIM_DRAIN_S)",
                 sig, self.drain.in_flight, self.drain_s)
        # A signal handler runs between two bytecodes of the loop's thread: schedule, never await.
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._stop_when_drained(sig)))

    async def _stop_when_drained(self, sig) -> None:
        if not await self.drain.wait_idle(self.drain_s):
            log.warning("%d request(s) still in flight after %.0f s (SHIM_DRAIN_S); stopping",
                        self.drain.in_flight, self.drain_s)
        super().handle_exit(sig, None)
