"""Thinking split out of an answer: what the model writes between `<think>` and `</think>`
goes to `reasoning`, the rest to `content` (the OpenAI chat route's `reasoning_content`).

Guarantees:
- the split of a whole text equals the concatenation of what `ReasoningSplitter` gives for
  the same text fed in any pieces (a stream and a reply carry the same reasoning);
- the tags themselves are in neither part; a `</think>` with no block open stays content;
- a template that opens the block in its own text after the last message (DeepSeek-R1's,
  Qwen3-Thinking's) starts the answer inside it: `opens_reasoning` reads that from the
  template's text alone, so no message can pretend to have opened one.
"""
from __future__ import annotations

from enum import IntEnum

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningMode(IntEnum):
    """Per row, from preprocess to postprocess (the REASONING tensor)."""
    DROP = 0  # clean-up removes thinking from the answer (/predict)
    SPLIT = 1  # thinking goes to `reasoning`; the prompt leaves no block open
    SPLIT_OPENED = 2  # the same, and the prompt's template opened a block


def opens_reasoning(template_tail: str) -> bool:
    """Whether the template's own text after the last message leaves a thinking block open."""
    return template_tail.rfind(THINK_START) > template_tail.rfind(THINK_END)


def _held_tag_prefix(text: str, tag: str) -> int:
    """How many characters at the end of `text` may begin `tag` (held until the next piece)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningSplitter:
    """Feeds a stream's text pieces; each call gives the (reasoning, content) it can settle.
    A possible partial tag at a piece's end is held back until the next piece or `finish`."""

    def __init__(self, opened: bool = False):
        self.thinking = opened
        self.seen = opened  # a block was opened: the answer has reasoning, maybe empty
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        text, self._held = self._held + text, ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            tag = THINK_END if self.thinking else THINK_START
            into = reasoning if self.thinking else content
            at = text.find(tag)
            if at < 0:
                keep = _held_tag_prefix(text, tag)
                into.append(text[:len(text) - keep])
                self._held = text[len(text) - keep:]
                break
            into.append(text[:at])
            text = text[at + len(tag):]
            self.thinking = not self.thinking
            self.seen = True
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What was held back: a tag's beginning that no tag completed is text."""
        held, self._held = self._held, ""
        return (held, "") if self.thinking else ("", held)


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer; reasoning None when no block was opened."""
    splitter = ReasoningSplitter(opened)
    reasoning, content = splitter.feed(text)
    rest_reasoning, rest_content = splitter.finish()
    return (reasoning + rest_reasoning if splitter.seen else None), content + rest_content
