"""The start-up fallback chain: retry a failed vLLM start with the fix its error asks for.

Steps, in order, each taken at most once and logged with its reason:
1. `compilation_config` rejected for its type: retry with it as a JSON string, or a dict;
2. `load_format` rejected: retry without it;
3. still failing on MetaX: retry with `enforce_eager=True`;
4. the KV cache cannot hold the model length: retry with the estimated length, or with
   SAFE_MAX_MODEL_LEN when the error names none (also when a default length was set);
then give up with `EngineStartError`, whose caller falls back to transformers or,
under FORCE_VLLM=1, fails the load with the root cause in one line.
Engines are built one at a time, and a failed attempt's memory is released first.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from ..engine_settings import SAFE_MAX_MODEL_LEN

log = logging.getLogger("generator.fallback")

Engine = TypeVar("Engine")

ESTIMATED_LEN = re.compile(r"estimated maximum model length is (\d+)")
LOAD_FORMAT_REJECTED = re.compile(r"load[_ ]format|Load format `[^`]*` is not supported", re.IGNORECASE)
KV_CACHE_OR_INIT = re.compile(
    r"KV cache|cache blocks|max seq len|Engine core initialization failed|max_model_len",
    re.IGNORECASE,
)


class EngineStartError(RuntimeError):
    """No attempt of the chain brought vLLM up."""


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def chain_text(error: BaseException) -> str:
    return "\n".join(f"{type(e).__name__}: {e}" for e in exception_chain(error))


def root_cause_line(error: BaseException) -> str:
    root = list(exception_chain(error))[-1]
    text = " ".join(str(root).split())
    return f"{type(root).__name__}: {text}"[:500]


def estimated_max_len(error: BaseException) -> int | None:
    match = ESTIMATED_LEN.search(chain_text(error))
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Retry:
    step: str
    reason: str
    kwargs: dict[str, Any]


def next_retry(kwargs: dict[str, Any], error: BaseException, metax: bool, taken: set[str],
               model_max_len: int | None = None) -> Retry | None:
    """The next fix for this error, or None when the chain has nothing left to try."""
    text = chain_text(error)
    first_line = root_cause_line(error)

    if "compilation" not in taken and "compilation_config" in kwargs and "compilation_config" in text:
        value = kwargs["compilation_config"]
        swapped = json.dumps(value) if isinstance(value, dict) else json.loads(value)
        kind = "a JSON string" if isinstance(value, dict) else "a dict"
        return Retry("compilation", f"compilation_config rejected ({first_line}); retrying it as {kind}",
                     {**kwargs, "compilation_config": swapped})

    init_failure = KV_CACHE_OR_INIT.search(text) is not None
    if "load_format" not in taken and "load_format" in kwargs and (LOAD_FORMAT_REJECTED.search(text) or init_failure):
        rest = {k: v for k, v in kwargs.items() if k != "load_format"}
        return Retry("load_format", f"load_format={kwargs['load_format']!r} rejected ({first_line}); retrying with the default",
                     rest)

    if metax and "eager" not in taken and not kwargs.get("enforce_eager"):
        return Retry("eager", f"start failed on MetaX ({first_line}); retrying with enforce_eager=True",
                     {**kwargs, "enforce_eager": True})

    if "max_len" not in taken:
        estimate = estimated_max_len(error)
        if estimate is not None:
            return Retry("max_len", f"KV cache too small ({first_line}); retrying with max_model_len={estimate}",
                         {**kwargs, "max_model_len": estimate})
        if init_failure:
            safe = SAFE_MAX_MODEL_LEN if model_max_len is None else min(SAFE_MAX_MODEL_LEN, model_max_len)
            current = kwargs.get("max_model_len")
            if current is None or current > safe:
                return Retry("max_len", f"KV-cache or engine initialization error ({first_line}); "
                             f"retrying with max_model_len={safe}", {**kwargs, "max_model_len": safe})
    return None


def build_with_fallbacks(construct: Callable[[dict[str, Any]], Engine], kwargs: dict[str, Any], *,
                         metax: bool, release: Callable[[], None] = lambda: None,
                         model_max_len: int | None = None) -> tuple[Engine, dict[str, Any]]:
    """The first engine that comes up, and the arguments that brought it up."""
    taken: set[str] = set()
    current = dict(kwargs)
    while True:
        try:
            return construct(current), current
        except Exception as error:  # every start failure is a candidate for the next step
            release()
            retry = next_retry(current, error, metax, taken, model_max_len)
            if retry is None:
                raise EngineStartError(root_cause_line(error)) from error
            log.warning("vLLM start failed, step %s: %s", retry.step, retry.reason)
            taken.add(retry.step)
            current = retry.kwargs
