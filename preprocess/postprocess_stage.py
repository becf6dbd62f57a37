"""The postprocess stage of the ensemble, as plain Python: `PostprocessStage.run` cleans the
answers and splits their thinking out where a row asked for it. The Triton model only moves
tensors in and out.
"""
from __future__ import annotations

from typing import Sequence

from . import settings as cfg
from .cleanup import clean_answer
from .reasoning import ReasoningMode, split_reasoning
from .routing import Route


class PostprocessStage:
    def __init__(self, settings: cfg.Settings):
        self.settings = settings.cleanup

    def run(self, texts: Sequence[str], routes: Sequence[str], is_code: Sequence[bool],
            reasoning: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
        """Per row the cleaned answer, and its thinking where the row asked for it split out
        (ReasoningMode.SPLIT*: the answer is cleaned without it; "" otherwise)."""
        answers, thoughts = [], []
        for k, (text, route, code) in enumerate(zip(texts, routes, is_code)):
            mode = ReasoningMode(int(reasoning[k])) if reasoning is not None else ReasoningMode.DROP
            thought = None
            if mode is not ReasoningMode.DROP:
                thought, text = split_reasoning(text, opened=mode is ReasoningMode.SPLIT_OPENED)
            answers.append(clean_answer(text, Route(route), bool(code), self.settings))
            thoughts.append(thought or "")
        return answers, thoughts
