"""Tool calling on /v1/chat/completions: what `tools` and `tool_choice` ask of the engine,
and the tool calls read back from its text.

- `none`: the tools go to the chat template; the answer is text.
- `required` and a named function: forced through structured output, as `vllm serve`
  forces them. Required: a JSON array of {"name", "parameters"} objects, each a declared
  tool with arguments that match its schema. Named: that function's arguments.
- `auto` (the default with tools): the model's own text, read by vLLM's tool parser for
  the model family (TOOL_CALL_PARSER, `hermes` by default: Qwen2.5/Qwen3 and Hermes
  models); text with no call stays text.
Routing and clean-up do not apply when tools may be called: a call's JSON is the model's own.
"""
from __future__ import annotations

import functools
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

from preprocess.reasoning import vllm_chat_request_class

from .errors import ApiError

log = logging.getLogger("shim.tools")


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none", "auto", "required" or "named"
    tools: tuple[dict, ...] = ()
    named: str | None = None  # the function of a named choice
    parallel: bool = True  # parallel_tool_calls: false allows one call only

    @property
    def calls_expected(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def response_format(self) -> dict | None:
        """The structured output that forces the calls (required, named), else None."""
        if self.mode == "named":
            schema = self._parameters(self.named)
        elif self.mode == "required":
            one_call = {"anyOf": [
                {"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                                  "parameters": self._parameters(tool["function"]["name"])},
                 "required": ["name", "parameters"], "additionalProperties": False} for tool in self.tools]}
            schema = {"type": "array", "minItems": 1, **({} if self.parallel else {"maxItems": 1}), "items": one_call}
        else:
            return None
        return {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": schema}}

    def _parameters(self, name: str) -> dict:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or {"type": "object", "properties": {}}

    def read(self, text: str, finish_reason: str | None, parser: "AutoParser | None" = None
             ) -> tuple[str | None, list[dict], str | None]:
        """(content, tool calls, finish reason) of an answer. A forced call cut short by the
        token limit is no call: its text comes back as content, finish_reason "length"."""
        if not self.calls_expected:
            return text, [], finish_reason
        if self.mode in ("named", "required"):
            try:
                value = json.loads(text)
                calls = [(self.named, value)] if self.mode == "named" else [(c["name"], c["parameters"]) for c in value]
            except (ValueError, KeyError, TypeError):  # cut short, or not what the grammar allowed
                return text, [], finish_reason
            return None, [tool_call(name, arguments) for name, arguments in calls], "tool_calls"
        if parser is None:
            return text, [], finish_reason
        content, calls = parser.extract(text)
        return (content, calls, "tool_calls") if calls else (text, [], finish_reason)


def tool_call(name: str, arguments: Any) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def plan(tools: list[dict] | None, tool_choice: Any, response_format: dict | None,
         parallel_tool_calls: bool | None = None) -> ToolPlan:
    """What the request asks, or ApiError 400 naming the field at fault."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ApiError(400, "tool_choice: needs tools", param="tool_choice")
        return ToolPlan("none")
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two tools have the same name", param="tools")
    choice = tool_choice if tool_choice is not None else "auto"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            raise ApiError(400, f"tool_choice: names no declared tool ({name!r}; declared: {', '.join(names)})",
                           param="tool_choice")
        mode = "named"
    elif choice in ("none", "auto", "required"):
        mode, name = choice, None
    else:
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if mode in ("named", "required") and response_format not in (None, {"type": "text"}):
        raise ApiError(400, "response_format: cannot be combined with a forced tool call (tool_choice "
                            f"{'required' if mode == 'required' else 'naming a function'})", param="response_format")
    return ToolPlan(mode, tuple(tools), name, parallel_tool_calls is not False)


class AutoParser:
    """vLLM's tool parser for the model family, on the shim's tokenizer. vLLM is imported on
    the first use only: the shim serves without it otherwise."""

    def __init__(self, name: str, tokenizer: Any, tools: tuple[dict, ...]):
        self.name, self.tokenizer, self.tools = name, tokenizer, tools

    def load(self) -> None:
        """Imports vLLM's parser (seconds, the first time): called off the event loop, before
        generating, so a missing parser is a 501 before any work is done."""
        vllm_tool_parser(self.name)

    def extract(self, text: str) -> tuple[str | None, list[dict]]:
        parser_class, request_class = vllm_tool_parser(self.name)
        request = request_class(model="served", messages=[{"role": "user", "content": "-"}],
                                tools=list(self.tools), tool_choice="auto")
        found = parser_class(self.tokenizer).extract_tool_calls(text, request)
        if not found.tools_called:
            return text, []
        return found.content, [tool_call(c.function.name, c.function.arguments) for c in found.tool_calls]


@functools.lru_cache(maxsize=4)
def vllm_tool_parser(name: str):
    """(parser class, ChatCompletionRequest class) from the installed vLLM, or ApiError 501."""
    try:
        from vllm.tool_parsers import ToolParserManager
        return ToolParserManager.get_tool_parser(name), vllm_chat_request_class()
    except (ImportError, KeyError) as exc:
        log.warning("tool parser %r unavailable: %s", name, exc)
        raise ApiError(501, f"tool_choice 'auto' needs vLLM's tool parser {name!r} (TOOL_CALL_PARSER), "
                            f"which this installation lacks ({exc})", param="tool_choice") from None
