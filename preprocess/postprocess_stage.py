"""The postprocess stage of the ensemble, as plain Python: `PostprocessStage.run` cleans the
answers and splits their thinking out where a row asked for it. The Triton model only moves
tensors in and out.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

from . import settings as cfg
from .cleanup import clean_answer
from .reasoning import ParserUnavailable, Reasoning, ReasoningMode, configured
from .routing import Route

log = logging.getLogger("postprocess")


class PostprocessStage:
    def __init__(self, settings: cfg.Settings):
        self.settings = settings.cleanup
        self._reasoning_choice = (settings.chat.reasoning_parser, settings.model_dir)

    @functools.cached_property
    def reasoning(self) -> Reasoning | None:
        """vLLM's parser, as the shim resolves it (preprocess.reasoning.configured), with the
        model's tokenizer, loaded on first use."""
        from .tokenizer import load_tokenizer

        choice, model_dir = self._reasoning_choice
        return None if choice == "none" else configured(choice, model_dir, load_tokenizer(model_dir))

    def prepare_reasoning(self) -> None:
        """Loads the tokenizer and vLLM's parser now, if one is configured; a parser the
        installed vLLM lacks is logged (the shim answers 501 for it)."""
        try:
            if (split := self.reasoning) is not None:
                split.load()
        except ParserUnavailable as exc:
            log.error("%s", exc)

    def run(self, texts: Sequence[str], routes: Sequence[str], is_code: Sequence[bool],
            modes: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
        """Per row the cleaned answer, and its thinking where the row asked for it split out
        (ReasoningMode.SPLIT*: the answer is cleaned without it; "" otherwise)."""
        answers, thoughts = [], []
        for k, (text, route, code) in enumerate(zip(texts, routes, is_code)):
            mode = ReasoningMode(int(modes[k])) if modes is not None else ReasoningMode.DROP
            thought = None
            if mode is not ReasoningMode.DROP and (split := self.reasoning) is not None:
                thought, text = split.split(text, opened=mode is ReasoningMode.SPLIT_OPENED,
                                                thinking_disabled=mode is ReasoningMode.SPLIT_THINKING_OFF)
            answers.append(clean_answer(text, Route(route), bool(code), self.settings))
            thoughts.append(thought or "")
        return answers, thoughts
