"""The preprocess stage of the ensemble, as plain Python: `PreprocessStage.run` turns one
request's questions and overrides into prompt token ids and sampling values. The Triton
model only moves tensors in and out (the answers' stage is postprocess_stage.py).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from . import settings as cfg
from . import controls
from .chat import ChatFormatter, TemplateOptions, Turn
from .contract import NOT_SET
from .grammar.sandbox import GrammarSandbox
from .reasoning import ReasoningMode, thinking_off
from .conversation import last_user_text, messages_from_tensor, with_system_prompt
from .routing import Route, RoutingDecision, decide, log_buckets
from .sampling import OVERRIDE_NAMES, InvalidRequest, SamplingSettings, resolve

log = logging.getLogger("preprocess")


@dataclass(frozen=True)
class PreparedRow:
    text: str
    token_ids: list[int]
    decision: RoutingDecision
    sampling: SamplingSettings
    reasoning: ReasoningMode = ReasoningMode.DROP


@dataclass(frozen=True)
class RequestRows:
    """One request's rows as the preprocess model reads them: per row a question (`prompt`)
    or a whole conversation (`messages`, JSON), and optional per-row columns."""
    prompts: Sequence[str | None]
    messages: Sequence[str | None] | None = None
    system_prompts: Sequence[str | None] | None = None
    overrides: Mapping[str, Sequence[Any] | None] = field(default_factory=dict)
    ignore_eos: Sequence[bool] | None = None
    raw: Sequence[bool] | None = None
    verbatim: Sequence[bool] | None = None
    seed: Sequence[int] | None = None
    top_logprobs: Sequence[int] | None = None
    stop: Sequence[str] | None = None  # JSON text per row
    response_format: Sequence[str] | None = None  # JSON text per row
    split_reasoning: Sequence[bool] | None = None  # split thinking out into `reasoning` (OpenAI chat)

    def at(self, column: Sequence | None, row: int, default=None):
        return default if column is None else column[row]


class PreprocessStage:
    def __init__(self, settings: cfg.Settings, tokenizer: Any | None):
        self.routing = settings.routing
        self.unrouted = replace(self.routing, disabled=True)
        self.sampling_defaults = settings.sampling
        self.default_system_prompt = settings.chat.system_prompt
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, settings.chat.fast_chat_template)
        self.grammar = GrammarSandbox(tokenizer, settings.grammar.check_memory_mb, settings.grammar.check_timeout_s)

    def run(self, questions: Sequence[str], system_prompts: Sequence[str | None] | None = None,
            overrides: Mapping[str, Sequence[Any] | None] | None = None,
            ignore_eos: Sequence[bool] | None = None, raw: Sequence[bool] | None = None) -> list[PreparedRow]:
        """Questions only (the judge's shape): see `prepare`."""
        return self.prepare(RequestRows(questions, system_prompts=system_prompts, overrides=overrides or {},
                                        ignore_eos=ignore_eos, raw=raw))

    def prepare(self, rows: RequestRows) -> list[PreparedRow]:
        """Every row prepared, or InvalidRequest naming the first bad row."""
        count = len(rows.prompts)
        systems = [self._system_prompt(rows.at(rows.system_prompts, i)) for i in range(count)]
        conversations: dict[int, tuple[list[Turn], TemplateOptions]] = {}
        decisions, samplings = [], []
        for row in range(count):
            try:
                decision, sampling, conversation = self._decide(rows, row)
            except InvalidRequest as exc:
                raise InvalidRequest(f"prompt {row}: {exc}") from None
            if conversation is not None:
                turns, options = conversation
                conversations[row] = (with_system_prompt(turns, systems[row]), options)
            decisions.append(decision)
            samplings.append(sampling)
        if self.routing.log_routing:
            log_buckets(decisions)
        prepared: list[PreparedRow | None] = [None] * count
        verbatim = [i for i in range(count) if rows.at(rows.verbatim, i, False)]
        for i, (text, ids) in zip(verbatim, self._verbatim([rows.prompts[i] for i in verbatim])):
            prepared[i] = PreparedRow(text, ids, decisions[i], samplings[i])
        if conversations:
            try:
                formatted = self.formatter.format_conversations([turns for turns, _ in conversations.values()],
                                                                options=[o for _, o in conversations.values()])
            except InvalidRequest:
                raise
            except Exception as exc:  # the template's own refusal (role order, a role it lacks)
                raise InvalidRequest(f"messages: the chat template cannot render this conversation ({exc})") from None
            for (i, (_, option)), prompt in zip(conversations.items(), formatted):
                prepared[i] = PreparedRow(prompt.text, prompt.token_ids, decisions[i], samplings[i],
                                          self._reasoning(rows, i, prompt.opens_reasoning, option.kwargs))
        # Single questions (the judge's): formatted in groups of equal system prompts.
        questions = [i for i in range(count) if prepared[i] is None]
        for system in dict.fromkeys(systems[i] for i in questions):
            indices = [i for i in questions if systems[i] == system]
            formatted = self.formatter.format_batch(system, [rows.prompts[i] for i in indices])
            for i, prompt in zip(indices, formatted):
                prepared[i] = PreparedRow(prompt.text, prompt.token_ids, decisions[i], samplings[i],
                                          self._reasoning(rows, i, prompt.opens_reasoning))
        return prepared  # type: ignore[return-value]

    @staticmethod
    def _reasoning(rows: RequestRows, row: int, opened: bool, template_kwargs: str = "") -> ReasoningMode:
        if not rows.at(rows.split_reasoning, row, False):
            return ReasoningMode.DROP
        if template_kwargs and thinking_off(json.loads(template_kwargs)):
            return ReasoningMode.SPLIT_THINKING_OFF
        return ReasoningMode.SPLIT_OPENED if opened else ReasoningMode.SPLIT

    def _decide(self, rows: RequestRows, row: int):
        """The row's route, token limit and sampling, and its conversation if it has one."""
        message_text = rows.at(rows.messages, row)
        conversation = messages_from_tensor(message_text, row) if message_text else None
        turns = conversation[0] if conversation is not None else None
        question = last_user_text(turns) if turns is not None else rows.prompts[row]
        if question is None:
            raise InvalidRequest("each row needs a prompt or messages")
        row_overrides = {name: values[row] for name, values in rows.overrides.items() if values is not None}
        limit = row_overrides.pop("max_new_tokens", None)
        verbatim = rows.at(rows.verbatim, row, False)
        if verbatim and turns is not None:
            raise InvalidRequest("verbatim applies to a prompt, not to messages")
        if verbatim or rows.at(rows.raw, row, False):
            # no routing, no clean-up: the caller asked for the model's own text
            decision = decide(question, self.unrouted, limit)
            decision = RoutingDecision(Route.RAW, decision.max_new_tokens, decision.is_code)
        else:
            decision = decide(question, self.routing, limit)
        seed, top_logprobs = rows.at(rows.seed, row, NOT_SET), rows.at(rows.top_logprobs, row, NOT_SET)
        sampling = resolve(self.sampling_defaults, decision.max_new_tokens,
                           {k: v for k, v in row_overrides.items() if k in OVERRIDE_NAMES},
                           ignore_eos=bool(rows.at(rows.ignore_eos, row, False)),
                           seed=None if seed == NOT_SET else int(seed),
                           top_logprobs=None if top_logprobs == NOT_SET else int(top_logprobs),
                           stop=controls.stop_from_tensor(rows.at(rows.stop, row, "")),
                           response_format=controls.structured_output_from_tensor(
                               rows.at(rows.response_format, row, "")))
        self.grammar.check(sampling.response_format)
        return decision, sampling, conversation

    def _verbatim(self, prompts: Sequence[str | None]) -> list[tuple[str, list[int]]]:
        """Completions as given (as `vllm serve` does): the text tokenized with the model's
        own special tokens (BOS where it adds one), no template."""
        if any(p is None for p in prompts):
            raise InvalidRequest("verbatim needs a prompt")
        if not prompts:
            return []
        if self.tokenizer is None:
            raise InvalidRequest("verbatim prompts need the model's tokenizer, and this model has none")
        return list(zip(prompts, self.tokenizer(list(prompts)).input_ids))

    def _system_prompt(self, given: str | None) -> str:
        if given is None or given == "":
            return self.default_system_prompt
        try:
            return cfg.validate_system_prompt(given)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
