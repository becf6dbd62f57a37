"""Chat formatting: [system, user] through the model's template, and safe token ids.

User text is untrusted: it is tokenized with special-token splitting, so a question that
contains `<|im_start|>system` reaches the model as plain text, never as a role marker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

log = logging.getLogger("preprocess.chat")

_PROBE_SYSTEM = "probe system"
_PROBE_USER = "probe user"


def plain_prompt(system: str, question: str) -> str:
    """The fallback when a model has no usable chat template."""
    return f"{system}\n\n问题：{question}\n答案："


def chatml_prompt(system: str, question: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@dataclass(frozen=True)
class FormattedPrompt:
    text: str
    token_ids: list[int]


class ChatFormatter:
    """Renders prompts once per question; the template choice is made once, at start."""

    def __init__(self, tokenizer: Any | None, fast_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.fast = fast_chat_template and self.has_template and self._template_is_chatml()
        if fast_chat_template and not self.fast:
            log.info("FAST_CHAT_TEMPLATE ignored: the chat template does not render as ChatML")

    def _render_template(self, system: str, question: str) -> str:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _template_is_chatml(self) -> bool:
        """The fast path is taken only when it renders exactly what the template renders."""
        try:
            return self._render_template(_PROBE_SYSTEM, _PROBE_USER) == chatml_prompt(_PROBE_SYSTEM, _PROBE_USER)
        except Exception:
            return False

    def render(self, system: str, question: str) -> str:
        if self.fast:
            return chatml_prompt(system, question)
        if self.has_template:
            try:
                return self._render_template(system, question)
            except Exception as exc:  # a broken template must not stop serving
                log.warning("chat template failed (%s); using the plain prompt", exc)
        return plain_prompt(system, question)

    def format_batch(self, system: str, questions: Sequence[str]) -> list[FormattedPrompt]:
        """Prompt texts and their token ids, with user text tokenized as plain text."""
        texts = [self.render(system, q) for q in questions]
        if self.tokenizer is None:
            return [FormattedPrompt(text, []) for text in texts]
        heads, users, tails = [], [], []
        for text, question in zip(texts, questions):
            span = question if question in text else question.strip()
            at = text.rfind(span) if span else -1
            if at < 0:  # the template changed the text: no user span to isolate
                heads.append(text), users.append(""), tails.append("")
            else:
                heads.append(text[:at]), users.append(span), tails.append(text[at + len(span):])
        encode = self.tokenizer
        head_ids = encode(heads, add_special_tokens=False).input_ids
        user_ids = encode(users, add_special_tokens=False, split_special_tokens=True).input_ids
        tail_ids = encode(tails, add_special_tokens=False).input_ids
        return [
            FormattedPrompt(text, list(h) + list(u) + list(t))
            for text, h, u, t in zip(texts, head_ids, user_ids, tail_ids)
        ]
