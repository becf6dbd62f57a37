"""The HTTP server's own limits, before any request reaches the app.

uvicorn with httptools accepts headers of any size, and neither of its protocols bounds
the time a client may take to send its request head (its keep-alive timer only runs
between requests). This h11 protocol adds both:
- the request head must be complete within SHIM_HEADER_TIMEOUT_S of the connection (or of
  the previous response), else 408 and the connection is closed;
- a head larger than SHIM_MAX_HEADER_BYTES is refused (431) by h11's own event-size limit;
- a connection whose request was answered before its body was read is closed after the answer.
The body's size and deadline are the Guards middleware's (shim/guards.py).
"""
from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("shim.door")


def _raw_reply(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode()
    return head + body


def hardened_protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HardenedH11Protocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _head_too_slow(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            log.info("closing a connection whose request head took over %.0f s", header_timeout_s)
            self.transport.write(_raw_reply(408, "Request Timeout",
                                            f"the request head did not arrive within {header_timeout_s:g} s "
                                            "(SHIM_HEADER_TIMEOUT_S)"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete; the body has its own deadline

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.SEND_BODY:
                # Answered before its declared body was read (a GET with a body, a refusal):
                # uvicorn would read the rest and drop it with no deadline, each byte cancelling
                # its keep-alive timer, so a trickling client could hold the connection forever.
                log.info("closing a connection answered before its request body was read")
                self.transport.close()
                return
            self._arm()  # the next request's head on this kept-alive connection

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """h11 refused the head: too large (431) or malformed (400), answered in JSON."""
            too_large = len(self.conn.trailing_data[0]) > self.config.h11_max_incomplete_event_size
            if too_large:
                self.transport.write(_raw_reply(431, "Request Header Fields Too Large",
                                                "the request head is over the limit of "
                                                f"{self.config.h11_max_incomplete_event_size} bytes "
                                                "(SHIM_MAX_HEADER_BYTES)"))
            else:
                self.transport.write(_raw_reply(400, "Bad Request", f"invalid HTTP request: {msg}"))
            self.transport.close()

    return HardenedH11Protocol
