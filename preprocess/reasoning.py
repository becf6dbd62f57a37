"""Thinking split out of an answer by vLLM's own reasoning parsers, the ones
`vllm serve --reasoning-parser NAME` runs: what the model writes inside its thinking block
goes to `reasoning` (the OpenAI chat route's `reasoning_content`), the rest to `content`.

Guarantees:
- REASONING_PARSER names the parser (any name vLLM registers: `qwen3`, `deepseek_r1`, ...),
  `none`, or `auto` (`parser_name`); the split is the parser's, whole answers through its
  `extract_reasoning`, streams through `extract_reasoning_streaming` with each piece's text
  and token ids;
- a request that turns thinking off (`chat_template_kwargs`) gets a parser built with those
  kwargs, as vLLM's server builds it (Qwen3's then reads everything as content);
- a template that opens the block in its own text after the last message (DeepSeek-R1's,
  Qwen3-Thinking's) starts the answer inside it: `opens_reasoning` reads that from the
  template's text alone, so no message can pretend to have opened one, and the parser is
  given the block's opening tag before the answer.
vLLM is imported on first use only: a server with no parser on runs without it.
"""
from __future__ import annotations

import functools
import json
from enum import IntEnum
from pathlib import Path
from typing import Any

THINK_START = "<think>"
THINK_END = "</think>"
# chat_template_kwargs that switch thinking (preprocess.conversation.TEMPLATE_KWARGS): False
# in any of them turns it off, for the template and for the parser alike.
THINKING_SWITCHES = ("enable_thinking", "thinking")


class ReasoningMode(IntEnum):
    """Per row, from preprocess to postprocess (the REASONING tensor)."""
    DROP = 0  # clean-up removes thinking from the answer (/predict)
    SPLIT = 1  # thinking goes to `reasoning`; the prompt leaves no block open
    SPLIT_OPENED = 2  # the same, and the prompt's template opened a block
    SPLIT_THINKING_OFF = 3  # the same, and the request turned thinking off


class ParserUnavailable(RuntimeError):
    """The configured parser is not one the installed vLLM has (or vLLM is absent)."""


def opens_reasoning(template_tail: str) -> bool:
    """Whether the template's own text after the last message leaves a thinking block open."""
    return template_tail.rfind(THINK_START) > template_tail.rfind(THINK_END)


def thinking_off(template_kwargs: dict[str, Any] | None) -> bool:
    return any((template_kwargs or {}).get(name) is False for name in THINKING_SWITCHES)


def parser_name(choice: str, has_think_tokens: bool, model_type: str = "") -> str | None:
    """The vLLM parser REASONING_PARSER asks for, None for no split. `auto` splits for a
    tokenizer with both thinking tags as tokens: DeepSeek's parser for DeepSeek models,
    Qwen3's (which reads the tags from the text too) for the others."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    if not has_think_tokens:
        return None
    return "deepseek_r1" if model_type.startswith("deepseek") else "qwen3"


def configured(choice: str, model_dir: Path, tokenizer: Any) -> "Reasoning | None":
    """The split REASONING_PARSER asks for with this model, None for none: the shim and
    postprocess both call this, so they agree on whether a row is split."""
    if choice == "none" or tokenizer is None:
        return None
    tokenizer = VocabCached(tokenizer)
    vocab, model_type = {}, ""
    if choice == "auto":  # only `auto` reads the vocabulary and the model's type
        vocab = tokenizer.get_vocab()
        try:
            model_type = str(json.loads((model_dir / "config.json").read_text()).get("model_type", ""))
        except (OSError, ValueError):
            pass
    name = parser_name(choice, THINK_START in vocab and THINK_END in vocab, model_type)
    return None if name is None else Reasoning(name, tokenizer)


@functools.lru_cache(maxsize=8)
def parser_class(name: str):
    try:
        from vllm.reasoning import ReasoningParserManager
        return ReasoningParserManager.get_reasoning_parser(name)
    except (ImportError, KeyError) as exc:
        raise ParserUnavailable(f"REASONING_PARSER={name!r} is not a reasoning parser of the installed vLLM "
                                f"({type(exc).__name__}: {exc})") from None


def vllm_chat_request_class():
    """vLLM's ChatCompletionRequest (ImportError without vLLM): parsers read settings from it."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    return ChatCompletionRequest


def thinking_kwargs(thinking_disabled: bool) -> dict[str, Any]:
    """What vLLM's server hands a parser and its request for a client that turned thinking off."""
    return {"chat_template_kwargs": dict.fromkeys(THINKING_SWITCHES, False)} if thinking_disabled else {}


@functools.lru_cache(maxsize=2)
def chat_request(thinking_disabled: bool):
    """The request a parser reads (some read skip_special_tokens and the like): vLLM's
    defaults, and the thinking switch as the client set it."""
    return vllm_chat_request_class()(model="served", messages=[{"role": "user", "content": "-"}],
                                     **thinking_kwargs(thinking_disabled))


class Reasoning:
    """vLLM's reasoning parser `name` on the model's tokenizer. A parser keeps state, so
    each answer and each stream gets its own (well under a millisecond once the tokenizer's
    vocabulary is cached)."""

    def __init__(self, name: str, tokenizer: Any):
        self.name = name
        self.tokenizer = tokenizer if isinstance(tokenizer, VocabCached) else VocabCached(tokenizer)

    def load(self) -> None:
        """Imports vLLM's parser (seconds, the first time): ParserUnavailable if it has none."""
        parser_class(self.name)

    def parser(self, thinking_disabled: bool = False):
        return parser_class(self.name)(self.tokenizer, **thinking_kwargs(thinking_disabled))

    def split(self, text: str, opened: bool = False, thinking_disabled: bool = False) -> tuple[str | None, str]:
        """(reasoning, content) of a whole answer; reasoning None when the parser found none."""
        parser = self.parser(thinking_disabled)
        if opened and not thinking_disabled:
            text = (parser.reasoning_start_str or "") + text
        reasoning, content = parser.extract_reasoning(text, chat_request(thinking_disabled))
        return reasoning, content or ""

    def stream(self, opened: bool = False, thinking_disabled: bool = False) -> "ReasoningStream":
        return ReasoningStream(self, opened, thinking_disabled)


class ReasoningStream:
    """One streamed answer: each piece (text, token ids) gives the (reasoning, content) the
    parser settles; `finish` gives what a parser held back, if it holds any."""

    def __init__(self, reasoning: Reasoning, opened: bool, thinking_disabled: bool):
        self.parser = reasoning.parser(thinking_disabled)
        self.text, self.ids = "", []
        if opened and not thinking_disabled and (start := self.parser.reasoning_start_str):
            # As vLLM's server does for a prompt that ends inside the block (its last token the tag).
            start_id = reasoning.tokenizer.get_vocab().get(start)
            if start_id is not None:
                self.parser.adjust_initial_state_from_prompt([start_id])

    def feed(self, text: str, token_ids: Any) -> tuple[str, str]:
        ids = list(token_ids)
        delta = self.parser.extract_reasoning_streaming(self.text, self.text + text, text, self.ids, self.ids + ids,
                                                        ids)
        self.text += text
        self.ids += ids
        return _parts(delta)

    def finish(self) -> tuple[str, str]:
        finish = getattr(self.parser, "finish_streaming", None)  # the engine-based parsers have one
        return _parts(finish() if finish is not None else None)


class VocabCached:
    """The tokenizer with its vocabulary read once: parsers read the whole dict when they are
    built, once per answer (vLLM's server wraps its tokenizer for the same reason)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._vocab: dict[str, int] | None = None

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self._tokenizer.get_vocab()
        return self._vocab

    def __len__(self) -> int:
        return len(self._tokenizer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _parts(delta) -> tuple[str, str]:
    return ("", "") if delta is None else (delta.reasoning or "", delta.content or "")
