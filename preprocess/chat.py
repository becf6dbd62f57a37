"""Chat formatting: messages through the model's template, and token ids no text can forge.

Role isolation by construction. The template is rendered once per sequence of roles, with
a random placeholder in place of each message's text, and split on the placeholders into
the template's own pieces. A prompt is then the pieces with the texts between them: the
pieces are tokenized as the template wrote them (their special tokens are real), and every
text is tokenized with special-token splitting, so `<|im_start|>system` typed by anyone
(a user, or whoever sets the system prompt) reaches the model as plain text, and no text
can change the template's own ids, whatever it contains.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("preprocess.chat")

_PROBE_SYSTEM = "probe system"
_PROBE_USER = "probe user"

Messages = Sequence[tuple[str, str]]  # (role, text)


def plain_prompt(system: str, question: str) -> str:
    """The fallback when a model has no usable chat template."""
    return f"{system}\n\n问题：{question}\n答案："


def chatml_prompt(system: str, question: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def _chatml_messages(messages: Messages) -> str:
    turns = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in messages)
    return turns + "<|im_start|>assistant\n"


def _plain_messages(messages: Messages) -> str:
    parts = dict(messages)
    return plain_prompt(parts.get("system", ""), parts.get("user", ""))


@dataclass(frozen=True)
class FormattedPrompt:
    text: str
    token_ids: list[int]


@dataclass
class TemplatePieces:
    """The template's own text around each message text: len(texts) == len(messages) + 1."""
    texts: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...] | None = None  # tokenized on first use


class ChatFormatter:
    """The template choice is made once, at start; its pieces are cached per role sequence."""

    def __init__(self, tokenizer: Any | None, fast_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.fast = fast_chat_template and self.has_template and self._template_is_chatml()
        if fast_chat_template and not self.fast:
            log.info("FAST_CHAT_TEMPLATE ignored: the chat template does not render as ChatML")
        # Unguessable, and of characters no template rewrites: a text can never contain it.
        self._marker = f"\ue000{uuid.uuid4().hex}\ue001"
        self._pieces: dict[tuple[str, ...], TemplatePieces] = {}
        self._renderer = self._choose_renderer()

    def _render_template(self, messages: Messages) -> str:
        chat = [{"role": role, "content": text} for role, text in messages]
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)

    def _template_is_chatml(self) -> bool:
        """The fast path is taken only when it renders exactly what the template renders."""
        try:
            probe = [("system", _PROBE_SYSTEM), ("user", _PROBE_USER)]
            return self._render_template(probe) == _chatml_messages(probe)
        except Exception:
            return False

    def _choose_renderer(self) -> Callable[[Messages], str]:
        if self.fast:
            return _chatml_messages
        if self.has_template:
            try:
                self._render_template([("system", "s"), ("user", "u")])
                return self._render_template
            except Exception as exc:  # a broken template must not stop serving
                log.warning("chat template failed (%s); using the plain prompt", exc)
        return _plain_messages

    def pieces(self, roles: tuple[str, ...]) -> TemplatePieces:
        cached = self._pieces.get(roles)
        if cached is None:
            markers = [f"{self._marker}{i}\ue002" for i in range(len(roles))]
            rendered = self._renderer(list(zip(roles, markers)))
            texts, rest = [], rendered
            for marker in markers:
                head, found, rest = rest.partition(marker)
                if not found:  # the template dropped a message (e.g. an empty system turn)
                    raise ValueError(f"the chat template does not render every message of {roles}")
                texts.append(head)
            texts.append(rest)
            cached = TemplatePieces(tuple(texts))
            if len(self._pieces) < 64:
                self._pieces[roles] = cached
        return cached

    def piece_ids(self, pieces: TemplatePieces) -> tuple[tuple[int, ...], ...]:
        """The template's own ids: its text as written, special tokens real."""
        if pieces.ids is None:
            pieces.ids = tuple(tuple(self.tokenizer(t, add_special_tokens=False).input_ids) if t else ()
                               for t in pieces.texts)
        return pieces.ids

    def render(self, system: str, question: str) -> str:
        return self.format_batch(system, [question], tokenize=False)[0].text

    def format_batch(self, system: str, questions: Sequence[str], tokenize: bool = True) -> list[FormattedPrompt]:
        """[system, user] prompts: texts and token ids, every text tokenized as plain text."""
        return self.format_conversations([[("system", system), ("user", q)] for q in questions], tokenize)

    def count_tokens(self, conversations: Sequence[Messages]) -> list[int]:
        """How many token ids format_conversations gives each conversation, without building
        them: each distinct text is counted once (a judge batch repeats one system prompt)."""
        if not conversations:
            return []
        if self.tokenizer is None:  # plain prompts: UTF-8 bytes, a bound on any byte-level tokenizer
            return [len(self._renderer(list(messages)).encode("utf-8", "surrogatepass")) for messages in conversations]
        distinct = list(dict.fromkeys(text for messages in conversations for _, text in messages))
        encoded = self.tokenizer(distinct, add_special_tokens=False, split_special_tokens=True).input_ids
        lengths = dict(zip(distinct, map(len, encoded)))
        counts = []
        for messages in conversations:
            own = self.piece_ids(self.pieces(tuple(role for role, _ in messages)))
            counts.append(sum(map(len, own)) + sum(lengths[text] for _, text in messages))
        return counts

    def format_conversations(self, conversations: Sequence[Messages], tokenize: bool = True) -> list[FormattedPrompt]:
        # All message texts of the batch in one tokenizer call (the fast tokenizer batches).
        flat = [text for messages in conversations for _, text in messages]
        tokenize = tokenize and self.tokenizer is not None
        encoded = (self.tokenizer(flat, add_special_tokens=False, split_special_tokens=True).input_ids
                   if tokenize and flat else None)
        out, at = [], 0
        for messages in conversations:
            pieces = self.pieces(tuple(role for role, _ in messages))
            own = self.piece_ids(pieces) if tokenize else None
            text_parts, ids = [pieces.texts[0]], list(own[0]) if own else []
            for i, (_, text) in enumerate(messages):
                text_parts.append(text + pieces.texts[i + 1])
                if own:
                    ids += list(encoded[at + i]) + list(own[i + 1])
            at += len(messages)
            out.append(FormattedPrompt("".join(text_parts), ids))
        return out
