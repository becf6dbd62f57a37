"""The preprocess and postprocess stages of the ensemble, as plain Python.

`PreprocessStage.run` turns one request's questions and overrides into prompt token ids
and sampling values; `PostprocessStage.run` cleans the answers. The Triton models only
move tensors in and out of these.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from . import settings as cfg
from .chat import ChatFormatter
from .cleanup import clean_answer
from .routing import Route, RoutingDecision, decide, log_buckets
from .sampling import OVERRIDE_NAMES, InvalidRequest, SamplingSettings, resolve

log = logging.getLogger("preprocess")


@dataclass(frozen=True)
class PreparedRow:
    text: str
    token_ids: list[int]
    decision: RoutingDecision
    sampling: SamplingSettings


class PreprocessStage:
    def __init__(self, settings: cfg.Settings, tokenizer: Any | None):
        self.routing = settings.routing
        self.unrouted = replace(self.routing, disabled=True)
        self.sampling_defaults = settings.sampling
        self.default_system_prompt = settings.chat.system_prompt
        self.formatter = ChatFormatter(tokenizer, settings.chat.fast_chat_template)

    def run(self, questions: Sequence[str], system_prompts: Sequence[str | None] | None = None,
            overrides: Mapping[str, Sequence[Any] | None] | None = None,
            ignore_eos: Sequence[bool] | None = None, raw: Sequence[bool] | None = None) -> list[PreparedRow]:
        """Every row prepared, or InvalidRequest naming the first bad row."""
        count = len(questions)
        overrides = overrides or {}
        systems = [self._system_prompt(s) for s in (system_prompts or [None] * count)]
        decisions, samplings = [], []
        for row, question in enumerate(questions):
            row_overrides = {name: values[row] for name, values in overrides.items() if values is not None}
            limit = row_overrides.pop("max_new_tokens", None)
            raw_row = bool(raw[row]) if raw is not None else False
            if raw_row:  # no routing, no clean-up: the caller asked for the model's own text
                decision = decide(question, self.unrouted, limit)
                decision = RoutingDecision(Route.RAW, decision.max_new_tokens, decision.is_code)
            else:
                decision = decide(question, self.routing, limit)
            try:
                sampling = resolve(self.sampling_defaults, decision.max_new_tokens,
                                   {k: v for k, v in row_overrides.items() if k in OVERRIDE_NAMES},
                                   ignore_eos=bool(ignore_eos[row]) if ignore_eos is not None else False)
            except InvalidRequest as exc:
                raise InvalidRequest(f"prompt {row}: {exc}") from None
            decisions.append(decision)
            samplings.append(sampling)
        if self.routing.log_routing:
            log_buckets(decisions)
        # One system prompt per request (the shim sends one): format in groups of equal prompts.
        rows: list[PreparedRow | None] = [None] * count
        for system in dict.fromkeys(systems):
            indices = [i for i, s in enumerate(systems) if s == system]
            formatted = self.formatter.format_batch(system, [questions[i] for i in indices])
            for i, prompt in zip(indices, formatted):
                rows[i] = PreparedRow(prompt.text, prompt.token_ids, decisions[i], samplings[i])
        return rows  # type: ignore[return-value]

    def _system_prompt(self, given: str | None) -> str:
        if given is None or given == "":
            return self.default_system_prompt
        try:
            return cfg.validate_system_prompt(given)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None


class PostprocessStage:
    def __init__(self, settings: cfg.Settings):
        self.settings = settings.cleanup

    def run(self, texts: Sequence[str], routes: Sequence[str], is_code: Sequence[bool]) -> list[str]:
        return [clean_answer(text, Route(route), bool(code), self.settings)
                for text, route, code in zip(texts, routes, is_code)]
