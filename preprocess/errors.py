"""The error vocabulary, written once: what kind a failed request is, the HTTP status and
Triton code each kind becomes, and how a status travels inside a message where Triton
carries none (a decoupled model's errors reach a gRPC client as their text only).

The policy per stage:
- the generator keeps state (engines, replicas): its own ValueError is a bug (INTERNAL),
  only InvalidRequest and the engine's refusals are the request's fault (INVALID);
- preprocess and postprocess keep none: whatever fails there failed on this request's
  content, so any exception is INVALID (triton_io.request_fault names it).
"""
from __future__ import annotations

import re
from enum import Enum


class ErrorKind(str, Enum):
    INVALID = "invalid"  # the request's fault: 400
    UNAVAILABLE = "unavailable"  # the engine is down, restarting, or the request was cancelled: 503, retry
    INTERNAL = "internal"  # a bug: 500, which the shim counts toward restarting a dead server

    @property
    def status(self) -> int:
        return _STATUS[self]

    @property
    def triton_code(self) -> str:
        """The name of pb_utils.TritonError's code (the class exists only inside a stub)."""
        return _TRITON_CODE[self]

    def tagged(self, message: str) -> str:
        """The message with its status in front, for a channel that carries text only."""
        return f"[{self.status}] {message}"


_STATUS = {ErrorKind.INVALID: 400, ErrorKind.UNAVAILABLE: 503, ErrorKind.INTERNAL: 500}
_TRITON_CODE = {ErrorKind.INVALID: "INVALID_ARG", ErrorKind.UNAVAILABLE: "UNAVAILABLE",
                ErrorKind.INTERNAL: "INTERNAL"}
_TAG = re.compile(r"\[(400|503|500)\] ")


def read_tag(message: str) -> tuple[int | None, str]:
    """(status, message without its tag) of a message `ErrorKind.tagged` made; (None, message)
    for one it did not."""
    found = _TAG.search(message)
    if found is None:
        return None, message
    return int(found.group(1)), message[:found.start()] + message[found.end():]
