"""Sampling settings of one request: defaults, overrides, validation, grouping.

Invalid values are refused here, before they reach vLLM, so no request can take the
engine down. Ranges follow vLLM's own SamplingParams checks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

from .settings import SamplingDefaults

OVERRIDE_NAMES = ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty")


class InvalidRequest(ValueError):
    """The request itself is wrong: the caller gets a 4xx naming the problem."""


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    frequency_penalty: float
    ignore_eos: bool = False  # benchmarks: every path generates exactly max_tokens

    def validate(self) -> "SamplingSettings":
        for name in ("temperature", "top_p", "repetition_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 (off) or at least 1, got {self.top_k}")
        if self.repetition_penalty <= 0 or self.repetition_penalty > 2:
            raise InvalidRequest(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise InvalidRequest(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        return self


def resolve(defaults: SamplingDefaults, max_tokens: int, overrides: Mapping[str, float | int | None],
            ignore_eos: bool = False) -> SamplingSettings:
    """Defaults with the request's overrides on top, validated."""
    base = SamplingSettings(
        ignore_eos=ignore_eos,
        max_tokens=max_tokens,
        temperature=defaults.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        repetition_penalty=defaults.repetition_penalty,
        frequency_penalty=defaults.frequency_penalty,
    )
    given = {k: v for k, v in overrides.items() if k in OVERRIDE_NAMES and v is not None}
    if "top_k" in given:
        top_k = given["top_k"]
        if isinstance(top_k, float) and (math.isnan(top_k) or top_k != int(top_k)):
            raise InvalidRequest(f"top_k must be an integer, got {top_k!r}")
        given["top_k"] = int(top_k)
    return replace(base, **given).validate()
