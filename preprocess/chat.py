"""Chat formatting: messages through the model's template, and token ids no text can forge.

Role isolation by construction. The template is rendered once per conversation shape (the
roles, which turns carry a name, a tool_call_id, tool calls; the tools and template
switches), with a random placeholder in place of each text (a message's content, name,
tool_call_id, a tool call's id, name and arguments), and split on the placeholders into
the template's own pieces. A prompt is then the pieces with the texts between them: the
pieces are tokenized as the template wrote them (their special tokens are real), and every
text is tokenized with special-token splitting, so `<|im_start|>system` typed by anyone
(a user, or whoever sets the system prompt) reaches the model as plain text, and no text
can change the template's own ids, whatever it contains. A text the template does not
render (a `name` most templates ignore) is left out, as the template would; a content it
does not render is an error. Tool definitions are template input, not isolated texts: one
that contains a special token of the tokenizer is refused.
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from .contract import InvalidRequest
from .reasoning import opens_reasoning

log = logging.getLogger("preprocess.chat")

_PROBE_SYSTEM = "probe system"
_PROBE_USER = "probe user"


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class Turn(NamedTuple):
    role: str
    text: str | None  # None: an assistant turn of tool calls only
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()

    def shape(self) -> tuple:
        return self.role, self.text is None, self.name is not None, self.tool_call_id is not None, len(self.tool_calls)

    def texts(self) -> list[str]:
        """Every text of the turn, in the order `chat_message` places their placeholders."""
        own = [t for t in (self.text, self.name, self.tool_call_id) if t is not None]
        return own + [text for call in self.tool_calls for text in call]

    def chat_message(self, texts: Sequence[str]) -> dict[str, Any]:
        """The message as a chat template takes it, with `texts` (one per texts()) in place."""
        it = iter(texts)
        # No content is "" (templates test it as `if message.content`; None would print "None").
        message: dict[str, Any] = {"role": self.role, "content": "" if self.text is None else next(it)}
        if self.name is not None:
            message["name"] = next(it)
        if self.tool_call_id is not None:
            message["tool_call_id"] = next(it)
        if self.tool_calls:
            message["tool_calls"] = [{"id": next(it), "type": "function",
                                      "function": {"name": next(it), "arguments": next(it)}} for _ in self.tool_calls]
        return message


@dataclass(frozen=True)
class TemplateOptions:
    """A conversation's extra template inputs, as canonical JSON text ("" for none)."""
    tools: str = ""
    kwargs: str = ""


Messages = Sequence[Turn | tuple[str, str]]  # (role, text) pairs are turns too
_JUDGE_SHAPE = (Turn("system", "").shape(), Turn("user", "").shape())
PIECES_CACHED = 64  # conversation shapes kept, the least recently used dropped first


def as_turns(messages: Messages) -> list[Turn]:
    return [m if isinstance(m, Turn) else Turn(*m) for m in messages]


def plain_prompt(system: str, question: str) -> str:
    """The fallback when a model has no usable chat template."""
    return f"{system}\n\n问题：{question}\n答案："


def _chatml_messages(messages: list[dict], options: TemplateOptions = TemplateOptions()) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _plain_messages(messages: list[dict], options: TemplateOptions = TemplateOptions()) -> str:
    parts = {m["role"]: m["content"] for m in messages}
    return plain_prompt(parts.get("system") or "", parts.get("user") or "")


@dataclass(frozen=True)
class FormattedPrompt:
    text: str
    token_ids: list[int]
    opens_reasoning: bool = False  # the template's own text leaves a thinking block open


@dataclass
class TemplatePieces:
    """The template's own text around the texts it renders: `slots[k]` is the index (in the
    conversation's texts, turn by turn) of the text between texts[k] and texts[k + 1]."""
    texts: tuple[str, ...]
    slots: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...] | None = None  # tokenized on first use


class ChatFormatter:
    """The template choice is made once, at start; its pieces are cached per conversation shape."""

    def __init__(self, tokenizer: Any | None, fast_chat_template: bool = False):
        self.tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.fast = fast_chat_template and self.has_template and self._template_is_chatml()
        if fast_chat_template and not self.fast:
            log.info("FAST_CHAT_TEMPLATE ignored: the chat template does not render as ChatML")
        # Unguessable, and of characters no template rewrites: a text can never contain it.
        self._marker = f"\ue000{uuid.uuid4().hex}\ue001"
        self._marker_at = re.compile(re.escape(self._marker) + "([0-9]+)\ue002")
        self._pieces: dict[tuple, TemplatePieces] = {}
        self._renderer = self._choose_renderer()
        self._special = self._special_tokens()

    def _render_template(self, messages: list[dict], options: TemplateOptions = TemplateOptions()) -> str:
        kwargs = json.loads(options.kwargs) if options.kwargs else {}
        if options.tools:
            kwargs["tools"] = json.loads(options.tools)
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def _template_is_chatml(self) -> bool:
        """The fast path is taken only when it renders exactly what the template renders."""
        try:
            probe = [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": _PROBE_USER}]
            return self._render_template(probe) == _chatml_messages(probe)
        except Exception:
            return False

    def _choose_renderer(self) -> Callable[[list[dict], TemplateOptions], str]:
        if self.fast:
            return _chatml_messages
        if self.has_template:
            try:
                self._render_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
                return self._render_template
            except Exception as exc:  # a broken template must not stop serving
                log.warning("chat template failed (%s); using the plain prompt", exc)
        return _plain_messages

    def _special_tokens(self) -> tuple[str, ...]:
        """The tokenizer's special and added tokens' texts: what a tool definition may not contain."""
        if self.tokenizer is None:
            return ()
        added = getattr(self.tokenizer, "get_added_vocab", lambda: {})()
        return tuple(sorted({*added, *getattr(self.tokenizer, "all_special_tokens", ())} - {""}, key=len))

    def _renderer_for(self, shape: tuple, options: TemplateOptions) -> Callable[[list[dict], TemplateOptions], str]:
        """The fast ChatML path renders what it was checked against, [system, user] (the
        judge's shape); any other conversation goes through the template itself, which may
        treat other roles, names, tool calls and switches its own way."""
        if self._renderer is _chatml_messages and not (shape == _JUDGE_SHAPE and options == TemplateOptions()):
            return self._render_template
        return self._renderer

    def check_tools(self, options: TemplateOptions) -> None:
        """InvalidRequest when a tool definition contains one of the tokenizer's special tokens."""
        for token in self._special:
            if token in options.tools:
                raise InvalidRequest(f"tools: a tool definition contains the special token {token!r}")

    def pieces(self, turns: Sequence[Turn], options: TemplateOptions = TemplateOptions()) -> TemplatePieces:
        shape = tuple(turn.shape() for turn in turns)
        key = (shape, options)
        # Least recently used first out: shapes a client can vary (tools, names) must not
        # crowd out the judge's, which every batch uses.
        cached = self._pieces.pop(key, None)
        if cached is None:
            counter = itertools.count()
            messages, contents = [], []
            for turn in turns:
                markers = [f"{self._marker}{next(counter)}\ue002" for _ in turn.texts()]
                if turn.text is not None:
                    contents.append(markers[0])
                messages.append(turn.chat_message(markers))
            rendered = self._renderer_for(shape, options)(messages, options)
            # Every message's content is in the prompt, else a refusal (a 400), never a
            # message dropped without a word. Names, call ids and tool calls are the
            # template's to show or not, as with vLLM's own server.
            missing = [m for m in contents if m not in rendered]
            if missing:  # e.g. an empty system turn the template leaves out
                raise InvalidRequest(f"the chat template does not render every message of {[t.role for t in turns]}")
            texts, slots, at = [], [], 0
            for found in self._marker_at.finditer(rendered):
                texts.append(rendered[at:found.start()])
                slots.append(int(found.group(1)))
                at = found.end()
            texts.append(rendered[at:])
            cached = TemplatePieces(tuple(texts), tuple(slots))
        self._pieces[key] = cached
        while len(self._pieces) > PIECES_CACHED:
            try:
                self._pieces.pop(next(iter(self._pieces)), None)
            except (StopIteration, RuntimeError):  # emptied or changed by another thread meanwhile
                break
        return cached

    def piece_ids(self, pieces: TemplatePieces) -> tuple[tuple[int, ...], ...]:
        """The template's own ids: its text as written, special tokens real."""
        if pieces.ids is None:
            pieces.ids = tuple(tuple(self.tokenizer(t, add_special_tokens=False).input_ids) if t else ()
                               for t in pieces.texts)
        return pieces.ids

    def format_batch(self, system: str, questions: Sequence[str], tokenize: bool = True) -> list[FormattedPrompt]:
        """[system, user] prompts: texts and token ids, every text tokenized as plain text."""
        return self.format_conversations([[("system", system), ("user", q)] for q in questions], tokenize)

    def count_tokens(self, conversations: Sequence[Messages],
                     options: Sequence[TemplateOptions] | None = None) -> list[int]:
        """How many token ids format_conversations gives each conversation, without building
        them: each distinct text is counted once (a judge batch repeats one system prompt)."""
        if not conversations:
            return []
        options = options or [TemplateOptions()] * len(conversations)
        for option in set(options):
            self.check_tools(option)
        if self.tokenizer is None:  # plain prompts: UTF-8 bytes, a bound on any byte-level tokenizer
            return [len(self._renderer([t.chat_message(t.texts()) for t in as_turns(messages)], option)
                        .encode("utf-8", "surrogatepass")) for messages, option in zip(conversations, options)]
        turned = [as_turns(messages) for messages in conversations]
        distinct = list(dict.fromkeys(text for turns in turned for turn in turns for text in turn.texts()))
        encoded = self.tokenizer(distinct, add_special_tokens=False, split_special_tokens=True).input_ids
        lengths = dict(zip(distinct, map(len, encoded)))
        counts = []
        for turns, option in zip(turned, options):
            pieces = self.pieces(turns, option)
            texts = [text for turn in turns for text in turn.texts()]
            counts.append(sum(map(len, self.piece_ids(pieces))) + sum(lengths[texts[slot]] for slot in pieces.slots))
        return counts

    def format_conversations(self, conversations: Sequence[Messages], tokenize: bool = True,
                             options: Sequence[TemplateOptions] | None = None) -> list[FormattedPrompt]:
        options = options or [TemplateOptions()] * len(conversations)
        for option in set(options):
            self.check_tools(option)
        turned = [as_turns(messages) for messages in conversations]
        # All texts of the batch in one tokenizer call (the fast tokenizer batches).
        flat = [text for turns in turned for turn in turns for text in turn.texts()]
        tokenize = tokenize and self.tokenizer is not None
        encoded = (self.tokenizer(flat, add_special_tokens=False, split_special_tokens=True).input_ids
                   if tokenize and flat else None)
        out, at = [], 0
        for turns, option in zip(turned, options):
            pieces = self.pieces(turns, option)
            own = self.piece_ids(pieces) if tokenize else None
            texts = [text for turn in turns for text in turn.texts()]
            text_parts, ids = [pieces.texts[0]], list(own[0]) if own else []
            for k, slot in enumerate(pieces.slots):
                text_parts.append(texts[slot] + pieces.texts[k + 1])
                if own:
                    ids += list(encoded[at + slot]) + list(own[k + 1])
            at += len(texts)
            out.append(FormattedPrompt("".join(text_parts), ids, opens_reasoning(pieces.texts[-1])))
        return out
