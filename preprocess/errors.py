"""The error vocabulary, written once: what kind a failed request is, and the HTTP status
and Triton code each kind becomes. Where Triton carries no code (a decoupled model's errors
reach a gRPC client as their text alone), the kind travels as its value in a tensor of its
own (contract.STREAM_OUTPUTS), never inside a message.

The policy per stage:
- the generator keeps state (engines, replicas): its own ValueError is a bug (INTERNAL),
  only InvalidRequest and the engine's refusals are the request's fault (INVALID);
- preprocess and postprocess keep none: whatever fails there failed on this request's
  content, so any exception is INVALID (triton_io.request_fault names it).
"""
from __future__ import annotations

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


_STATUS = {ErrorKind.INVALID: 400, ErrorKind.UNAVAILABLE: 503, ErrorKind.INTERNAL: 500}
_TRITON_CODE = {ErrorKind.INVALID: "INVALID_ARG", ErrorKind.UNAVAILABLE: "UNAVAILABLE",
                ErrorKind.INTERNAL: "INTERNAL"}
