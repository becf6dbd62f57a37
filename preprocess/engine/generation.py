"""What the generator's backends share: the work item, its result, and the runner contract."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .. import controls
from ..contract import InvalidRequest
from ..errors import ErrorKind
from ..sampling import SamplingSettings

log = logging.getLogger("generator")

# Per generated token: (its text, its logprob, the top tokens as [(text, logprob)]).
TokenLogprobs = tuple[str, float, list[tuple[str, float]]]


@dataclass(frozen=True)
class GenerationItem:
    token_ids: list[int]
    sampling: SamplingSettings


def logprobs_json(rows: Sequence[TokenLogprobs] | None) -> str:
    """The LOGPROBS tensor's text for one answer or piece: "" when none were asked for."""
    return "" if rows is None else json.dumps(rows, ensure_ascii=False)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str = "stop"
    ttft_s: float | None = None  # time to first token, from vLLM's request stats
    e2e_s: float | None = None
    logprobs: list[TokenLogprobs] | None = None  # when the request asked for them

    def logprobs_json(self) -> str:
        return logprobs_json(self.logprobs)


@dataclass(frozen=True)
class StreamDelta:
    """A piece of one streamed answer: the text and tokens generated since the last piece.
    The last piece has `finish_reason` set; a stream ends with it or with an error."""
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None
    # The piece's token ids: vLLM's reasoning parsers read the thinking tags from them.
    token_ids: tuple[int, ...] = ()

    @classmethod
    def whole(cls, result: GenerationResult) -> "StreamDelta":
        """A whole answer as one last piece (a backend that cannot stream; no token ids)."""
        return cls(result.text, result.completion_tokens, result.prompt_tokens, result.finish_reason, result.logprobs)


def generation_items(prompts: Sequence[list[int]], columns: dict[str, list[Any]]) -> list[GenerationItem]:
    """One item per prompt from the generator's input columns (SamplingSettings field ->
    one value per row; STOP as JSON text), each checked, or InvalidRequest naming the row.
    Equal settings are checked once: a judge batch shares one setting over hundreds of rows."""
    items, checked = [], set()
    for row, ids in enumerate(prompts):
        values = {field: column[row] for field, column in columns.items()}
        try:
            if "stop" in values:
                values["stop"] = controls.stop_from_tensor(values["stop"])
            sampling = SamplingSettings(**values)
            if sampling not in checked:
                checked.add(sampling.validate())
            items.append(GenerationItem(ids, sampling))
        except InvalidRequest as exc:
            raise InvalidRequest(f"prompt {row}: {exc}") from None
    return items


Completion = Callable[[list[GenerationResult] | BaseException], None]
StreamListener = Callable[[StreamDelta | BaseException], None]


class Runner(Protocol):
    """What GeneratorService relies on in a backend (VllmRunner, TransformersRunner)."""
    backend: str  # "vllm" or "transformers", shown in /info and the metrics
    max_model_len: int  # prompts longer than this are refused before submission
    on_submit: Callable[[Sequence[GenerationItem], int], None] | None  # metrics hook: items, sampling groups

    engine_mode: str  # shown in /info
    engine_kwargs: dict[str, Any]  # what the engine was built with, shown in /info
    scheduler: dict[str, Any]  # the scheduler settings it runs with ({} when it has none)

    def submit(self, items: Sequence[GenerationItem], on_done: Completion) -> "BatchHandle": ...

    def stream(self, item: GenerationItem, on_delta: "StreamListener") -> "BatchHandle": ...

    def cancel(self, handle: "BatchHandle") -> None: ...

    @property
    def healthy(self) -> bool: ...

    def shutdown(self, timeout_s: float) -> None: ...


@dataclass(eq=False)
class BatchHandle:
    """One Triton request's prompts, as the backend tracks them (compared by identity)."""
    batch_id: str
    future: object | None = None
    cancelled: bool = False
    # Set by GeneratorService: (replica, the replica runner's own handle) for each part.
    parts: list = field(default_factory=list)


# vLLM's own exception classes for a refused request, named rather than imported: vLLM may
# be absent (transformers).
ENGINE_REFUSALS = ("VLLMValidationError",)


class PromptTooLong(ValueError):
    """A prompt does not fit the model length: refused for that request only."""


class EngineUnavailable(RuntimeError):
    """The engine is down or restarting: the caller gets a 503 and may retry."""


# vLLM's own exception classes, named rather than imported: vLLM may be absent (transformers).
ENGINE_DEATHS = ("EngineDeadError",)  # the engine process is gone; the watchdog rebuilds it


def classify_error(exc: BaseException, engine_healthy: bool = True) -> ErrorKind:
    """The kind of a failed generation (preprocess.errors): a plain ValueError is INTERNAL,
    since our own code raising it is a bug, not bad input."""
    if isinstance(exc, (InvalidRequest, PromptTooLong)) or type(exc).__name__ in ENGINE_REFUSALS:
        return ErrorKind.INVALID
    if (isinstance(exc, (EngineUnavailable, asyncio.CancelledError)) or type(exc).__name__ in ENGINE_DEATHS
            or not engine_healthy):
        return ErrorKind.UNAVAILABLE
    return ErrorKind.INTERNAL


def client_error(exc: BaseException, engine_healthy: bool = True) -> tuple[ErrorKind, str]:
    """The kind of a failed generation and the text its client gets, whole or streamed: bad
    input keeps its message; an internal error is logged here and the client gets no class
    names or internals."""
    kind = classify_error(exc, engine_healthy)
    if kind is ErrorKind.INTERNAL:
        log.error("internal error answering a request: %s: %s", type(exc).__name__, exc)
        return kind, "internal error in the generator (see the server log)"
    if kind is ErrorKind.UNAVAILABLE:
        return kind, f"the generator engine is unavailable or restarting; retry shortly ({exc})"
    return kind, str(exc)


def group_by_sampling(items: Sequence[GenerationItem]) -> dict[SamplingSettings, list[int]]:
    """Indices of the items per distinct sampling settings, the groups with the largest
    `max_tokens` first (equal limits in first-seen order), each group's indices in item order.

    Equal settings share one engine submission (and one SamplingParams), which keeps
    vLLM's batching intact; a per-prompt parameter list would break it. The order is the
    order the runners hand prompts to the engine, and vLLM admits and prefills in arrival
    order: a batch is done when its longest answer is, so the answers allowed to run longest
    start first (longest processing time first) and the short ones fill in beside them.
    """
    groups: dict[SamplingSettings, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[item.sampling].append(index)
    return dict(sorted(groups.items(), key=lambda group: -group[0].max_tokens))


# next() on itertools.count is atomic in CPython, so ids stay unique across threads
# without a lock.
_batch_ids = itertools.count()


def new_batch_id() -> str:
    return f"b{next(_batch_ids)}"


def check_prompt_length(index: int, tokens: int, max_model_len: int | None) -> None:
    """Refuse a prompt that leaves no room to generate (the engine would refuse it)."""
    if max_model_len is not None and tokens >= max_model_len:
        raise PromptTooLong(f"prompt {index} has {tokens} tokens; the model length is {max_model_len}")


def check_prompt_lengths(items: Sequence[GenerationItem], max_model_len: int | None) -> None:
    for index, item in enumerate(items):
        check_prompt_length(index, len(item.token_ids), max_model_len)
