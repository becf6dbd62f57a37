"""The work a request asks of the engine, counted before it is admitted, and the work the
server has taken on and not yet answered.

A request's work is its prompt tokens, after the chat template, plus n x the new tokens it
may ask for (its own limit, or the largest routing limit): prefill is work too, and four
7,000-token prompts with `max_new_tokens: 1` held a CPU engine for 45 s when only the new
tokens were counted. One request may ask for at most SHIM_MAX_REQUEST_TOKENS (413); all
requests admitted and unanswered together at most SHIM_MAX_QUEUED_TOKENS, past which a
request is refused with 429 and Retry-After instead of joining a queue that only grows.
"""
from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Iterator, Sequence

from preprocess.chat import ChatFormatter, as_turns
from preprocess.conversation import read_conversation, with_system_prompt
from preprocess.reasoning import opens_reasoning

from .errors import ApiError

RETRY_AFTER_S = 1


class PromptCounter:
    """Prompt tokens as the preprocess stage will make them (the same template and
    tokenizer), for the budget only: nothing here is sent to the engine."""

    def __init__(self, tokenizer: Any | None, fast_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, fast_chat_template)

    def count(self, rows: Sequence[str], system_prompt: str, row_input: str = "prompt",
              verbatim: bool = False) -> list[int]:
        """Per row: a question, a conversation (JSON, row_input "messages"), or a prompt as
        given (verbatim: the completions route)."""
        if not rows:
            return []
        if verbatim:
            if self.tokenizer is None:
                return [len(row.encode("utf-8")) for row in rows]
            return [len(ids) for ids in self.tokenizer(list(rows)).input_ids]
        if row_input == "messages":
            read = [read_conversation(json.loads(row)) for row in rows]
            return self.formatter.count_tokens([with_system_prompt(turns, system_prompt) for turns, _ in read],
                                               [options for _, options in read])
        return self.formatter.count_tokens([[("system", system_prompt), ("user", row)] for row in rows])

    def opens_reasoning(self, row: str, system_prompt: str, row_input: str = "prompt") -> bool:
        """Whether this row's prompt, as preprocess will render it, starts the answer inside a
        thinking block (preprocess.reasoning.opens_reasoning on the template's own tail)."""
        if row_input == "messages":
            turns, options = read_conversation(json.loads(row))
            return opens_reasoning(self.formatter.pieces(as_turns(with_system_prompt(turns, system_prompt)),
                                                         options).texts[-1])
        return opens_reasoning(self.formatter.pieces(as_turns([("system", system_prompt), ("user", row)])).texts[-1])


def request_work(prompt_tokens: Sequence[int], choices: int, max_new_tokens: int) -> int:
    """Prompt tokens once per prompt (its n choices share the prefill), new tokens per choice."""
    return sum(prompt_tokens) + len(prompt_tokens) * choices * max_new_tokens


def check_request_work(prompt_tokens: Sequence[int], choices: int, max_new_tokens: int, limit: int) -> int:
    """The request's work, or a 413 that says what it is made of."""
    work = request_work(prompt_tokens, choices, max_new_tokens)
    if work > limit:
        raise ApiError(413, f"the request asks for up to {work} tokens of work ({sum(prompt_tokens)} prompt tokens "
                            f"+ {len(prompt_tokens)} prompts x {choices} choices x {max_new_tokens} new tokens); "
                            f"the limit is {limit} (SHIM_MAX_REQUEST_TOKENS)")
    return work


class WorkLedger:
    """The work admitted and not yet answered, over every route that generates."""

    def __init__(self, limit: int, on_change=None):
        self.limit = limit
        self.queued = 0
        self.on_change = on_change  # a gauge's set, for /metrics
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, work: int) -> Iterator[None]:
        """Held while the request's work runs; a 429 when it does not fit beside the rest."""
        with self._lock:
            if self.queued and self.queued + work > self.limit:
                raise ApiError(429, f"the server is busy: {self.queued} tokens of work are queued and this request "
                                    f"asks for {work}; the limit is {self.limit} (SHIM_MAX_QUEUED_TOKENS). "
                                    f"Retry after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._add(work)
        try:
            yield
        finally:
            with self._lock:
                self._add(-work)

    def _add(self, work: int) -> None:
        self.queued += work
        if self.on_change is not None:
            self.on_change(self.queued)
