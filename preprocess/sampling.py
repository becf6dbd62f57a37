"""Sampling settings of one request: defaults, overrides, validation, grouping.

Every value is checked against `contract.SETTINGS` (vLLM's own ranges) here, before it
reaches vLLM, so no request can make the engine refuse it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from .contract import SAMPLING_NAMES, SETTINGS, InvalidRequest, OutOfRange
from .settings import SamplingDefaults

OVERRIDE_NAMES = SAMPLING_NAMES

__all__ = ["InvalidRequest", "SamplingSettings", "resolve", "OVERRIDE_NAMES"]


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
        try:
            SETTINGS["max_new_tokens"].check(self.max_tokens)
            for name in SAMPLING_NAMES:
                SETTINGS[name].check(getattr(self, name))
        except OutOfRange as exc:
            raise InvalidRequest(str(exc)) from None
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
    settings = replace(base, **given).validate()
    return replace(settings, top_k=int(settings.top_k))
