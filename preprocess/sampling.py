"""Sampling settings of one request: defaults, overrides, validation, grouping.

Every value is checked against `contract.SETTINGS` (vLLM's own ranges) here, before it
reaches vLLM, so no request can make the engine refuse it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from . import controls
from .contract import NOT_SET, SAMPLING_NAMES, SETTINGS, InvalidRequest, OutOfRange
from .settings import SamplingDefaults

log = logging.getLogger("preprocess.sampling")

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
    presence_penalty: float = 0.0
    ignore_eos: bool = False  # benchmarks: every path generates exactly max_tokens
    seed: int = NOT_SET
    top_logprobs: int = NOT_SET  # NOT_SET: no logprobs; 0: the sampled token's only
    stop: tuple[str, ...] = ()  # the request's own, on top of the server's STOP_STRINGS
    response_format: str = ""  # controls.structured_output's form; "" for free text

    def tensor_text(self, field: str) -> str:
        """A text control (contract.GENERATOR_TEXTS) as the generator's tensor carries it."""
        return controls.stop_to_tensor(self.stop) if field == "stop" else getattr(self, field)

    def validate(self) -> "SamplingSettings":
        try:
            SETTINGS["max_new_tokens"].check(self.max_tokens)
            for name in SAMPLING_NAMES:
                SETTINGS[name].check(getattr(self, name))
            for name in ("seed", "top_logprobs"):
                if getattr(self, name) != NOT_SET:
                    SETTINGS[name].check(getattr(self, name))
        except OutOfRange as exc:
            raise InvalidRequest(str(exc)) from None
        controls.stop_strings(self.stop)
        controls.structured_output_kwargs(self.response_format)
        return self


def resolve(defaults: SamplingDefaults, max_tokens: int, overrides: Mapping[str, float | int | None],
            ignore_eos: bool = False, seed: int | None = None, top_logprobs: int | None = None,
            stop: tuple[str, ...] = (), response_format: str = "") -> SamplingSettings:
    """Defaults with the request's overrides and controls on top, validated."""
    base = SamplingSettings(
        ignore_eos=ignore_eos,
        max_tokens=max_tokens,
        **{name: getattr(defaults, name) for name in SAMPLING_NAMES},
        seed=NOT_SET if seed is None else seed,
        top_logprobs=NOT_SET if top_logprobs is None else top_logprobs,
        stop=stop,
        response_format=response_format,
    )
    given = {k: v for k, v in overrides.items() if k in OVERRIDE_NAMES and v is not None}
    settings = replace(base, **given).validate()
    return replace(settings, top_k=int(settings.top_k))


# What /v1 applies to a sampling field a client leaves out: the model's own
# generation_config.json, as `vllm serve` does, over OpenAI's neutral values. The judge's
# defaults (TEMPERATURE, TOP_K...) are for /predict: with them, a client sending
# `temperature` alone would still get greedy text (top_k 1).
OPENAI_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
                  "frequency_penalty": 0.0, "presence_penalty": 0.0}
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")  # what vLLM reads there


def model_sampling_defaults(model_dir: Path) -> dict[str, float | int]:
    """OPENAI_NEUTRAL with the sampling fields of `model_dir/generation_config.json` on
    top; a value outside the contract's range is left out (logged)."""
    defaults = dict(OPENAI_NEUTRAL)
    try:
        config = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return defaults
    for name in GENERATION_CONFIG_FIELDS:
        value = config.get(name) if isinstance(config, dict) else None
        if name == "top_k" and value == 0:  # transformers' "off"
            value = -1
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        try:
            SETTINGS[name].check(value)
        except OutOfRange as exc:
            log.warning("generation_config.json: %s left out of the /v1 defaults (%s)", name, exc)
            continue
        defaults[name] = int(value) if name == "top_k" else float(value)
    return defaults
