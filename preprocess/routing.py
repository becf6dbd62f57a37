"""Question-type routing: picks max_new_tokens so short questions stay short.

Order, strictest first: hard code, long answer, code, short. Keywords match as substrings
of the stripped, lower-cased question.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

from .contract import clip_new_tokens
from .settings import RoutingSettings

log = logging.getLogger("preprocess.routing")


class Route(str, Enum):
    HARD_CODE = "hard_code"
    LONG_ANSWER = "long_answer"
    CODE = "code"
    SHORT = "short"
    RAW = "raw"  # routing and clean-up skipped at the caller's request


@dataclass(frozen=True)
class RoutingDecision:
    route: Route
    max_new_tokens: int
    is_code: bool


def normalize(question: str) -> str:
    return question.strip().lower()


def _hits(text: str, keywords: Iterable[str]) -> int:
    return sum(1 for keyword in keywords if keyword and keyword in text)


def is_code_question(question: str, settings: RoutingSettings) -> bool:
    return _hits(normalize(question), settings.code_keywords) >= 1


def classify(question: str, settings: RoutingSettings) -> Route:
    text = normalize(question)
    if _hits(text, settings.hard_code_keywords) >= settings.hard_code_min_hits:
        return Route.HARD_CODE
    if settings.long_answer_enabled and _hits(text, settings.long_answer_keywords) >= settings.long_answer_min_hits:
        return Route.LONG_ANSWER
    if _hits(text, settings.code_keywords) >= 1:
        return Route.CODE
    return Route.SHORT


def limit_for(route: Route, settings: RoutingSettings) -> int:
    return {
        Route.HARD_CODE: settings.max_new_tokens_code_hard,
        Route.LONG_ANSWER: settings.max_new_tokens_code,
        Route.CODE: settings.max_new_tokens_code_soft,
        Route.SHORT: settings.max_new_tokens,
    }[route]


def decide(question: str, settings: RoutingSettings, override: int | None = None) -> RoutingDecision:
    """The route and token limit of one question; a request's own limit wins, clipped 1..4096."""
    route = Route.SHORT if settings.disabled else classify(question, settings)
    limit = limit_for(route, settings) if override is None else clip_new_tokens(override)
    return RoutingDecision(route=route, max_new_tokens=limit, is_code=is_code_question(question, settings))


def log_buckets(decisions: Iterable[RoutingDecision]) -> None:
    """One line per request batch: how many prompts went to each token limit."""
    buckets = Counter((d.route.value, d.max_new_tokens) for d in decisions)
    summary = ", ".join(f"{route}/{limit}: {count}" for (route, limit), count in sorted(buckets.items()))
    log.info("token routing: %s", summary)
