"""Answer clean-up: thinking blocks out, short answers kept short.

Guarantees: no thinking text survives, whether the block is closed, unclosed (an answer
cut off mid-thought) or only a lone `</think>` ends it; and sentence splitting keeps the
newlines it splits on. (docs/differences.md lists these against the replaced
service.)
"""
from __future__ import annotations

import re

from .routing import Route
from .settings import CleanupSettings

THINK_BLOCK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
THINK_TAG = re.compile(r"</?think>")
EXAMPLE_MARKER = re.compile(r"(例如|比如|举例来说|举例)\s*[:：]")
SENTENCE_END = re.compile(r"[^。！？；\n]*(?:[。！？；\n]|$)")
TRAILING_PUNCTUATION = "，,、；;：:。.！!？? \t\r\n"


def strip_think(text: str) -> str:
    """Remove thinking, keeping the answer even when the model put it inside the block.

    1. remove complete <think>...</think> blocks;
    2. if nothing is left, keep the inside of the first block;
    3. else remove stray tags: a lone </think> drops what came before it (that was
       thinking whose opening tag was in the prompt), an unclosed <think> drops what follows.
    """
    blocks = THINK_BLOCK.findall(text)
    without = THINK_BLOCK.sub("", text)
    if blocks and not without.strip():
        return blocks[0].strip()
    if "</think>" in without:
        thought, answer = without.rsplit("</think>", 1)
        without = answer if answer.strip() else thought
    if "<think>" in without:
        head, thought = without.split("<think>", 1)
        without = head if head.strip() else thought
    return THINK_TAG.sub("", without).strip()


def trim_examples(text: str) -> str:
    match = EXAMPLE_MARKER.search(text)
    if match:
        text = text[: match.start()]
    return text.rstrip(TRAILING_PUNCTUATION)


def keep_sentences(text: str, limit: int) -> str:
    """The first `limit` sentences, each with its own separator (newlines included)."""
    sentences = [s for s in SENTENCE_END.findall(text) if s]
    return "".join(sentences[:limit]).strip()


def clean_answer(raw: str, route: Route, is_code: bool, settings: CleanupSettings) -> str:
    if route is Route.RAW:
        return raw
    text = strip_think(raw)
    if route is not Route.SHORT:
        return text
    if settings.trim_examples and not is_code:
        text = trim_examples(text)
    return keep_sentences(text, settings.max_sentences)
