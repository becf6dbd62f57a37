"""Whole conversations: the ensemble's `messages` input, read and checked.

A row's `messages` is a JSON array of messages as OpenAI clients send them, or an object
{"messages": [...], "tools": [...], "chat_template_kwargs": {...}}. Roles are system,
developer (the system role by its newer name), user, assistant and tool. A message may
carry a `name`; a tool turn its `tool_call_id`; an assistant turn `tool_calls` (then its
content may be null). Every text (content, name, ids, a call's name and arguments) is
formatted by `chat.ChatFormatter` isolated, so none can forge another role. `tools` and the
allowed `chat_template_kwargs` go to the model's chat template; a tool definition may not
contain the tokenizer's special tokens (it is template text, not an isolated text).
Routing reads the last user turn.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from .chat import TemplateOptions, ToolCall, Turn
from .contract import InvalidRequest
from .controls import load_json

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TURNS = 256
MAX_TOOL_CALLS = 32  # in one assistant turn
MAX_TOOLS = 64
MAX_MESSAGES_CHARS = 1_000_000  # the JSON text of one conversation; the model length bounds it further
# chat_template_kwargs a client may set: switches of the templates in use, nothing that
# changes what the template is (`chat_template`) or what it is given (`tools`, `documents`).
TEMPLATE_KWARGS = {"enable_thinking": bool, "thinking": bool}


def _text(value: Any, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string")
    return value


def _tool_calls(value: Any, where: str) -> tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOL_CALLS:
        raise InvalidRequest(f"{where} must be an array of at most {MAX_TOOL_CALLS} tool calls")
    calls = []
    for index, call in enumerate(value):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise InvalidRequest(f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}")
        calls.append(ToolCall(_text(call.get("id", ""), f"{at}.id"), _text(function.get("name"), f"{at}.function.name"),
                              _text(function.get("arguments", ""), f"{at}.function.arguments")))
    return tuple(calls)


def read_messages(items: Any, where: str = "messages") -> list[Turn]:
    """The turns of a list of messages, or InvalidRequest naming the turn at fault."""
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"{where} must be a non-empty array of messages")
    if len(items) > MAX_TURNS:
        raise InvalidRequest(f"{where} has {len(items)} messages; the limit is {MAX_TURNS}")
    turns = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        role = item.get("role") if isinstance(item, dict) else None
        if role not in ROLES:
            raise InvalidRequest(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
        calls = _tool_calls(item.get("tool_calls"), f"{at}.tool_calls") if role == "assistant" else ()
        if item.get("tool_calls") is not None and role != "assistant":
            raise InvalidRequest(f"{at}.tool_calls: only an assistant message makes tool calls")
        content = _text(item.get("content"), f"{at}.content", optional=bool(calls))
        tool_call_id = _text(item.get("tool_call_id"), f"{at}.tool_call_id", optional=True)
        if tool_call_id is not None and role != "tool":
            raise InvalidRequest(f"{at}.tool_call_id: only a tool message answers a tool call")
        turns.append(Turn(ROLES[role], content, _text(item.get("name"), f"{at}.name", optional=True),
                          tool_call_id, calls))
    require_user_turn([turn.role for turn in turns], where)
    return turns


def require_user_turn(roles: Sequence[str], where: str = "messages") -> None:
    """InvalidRequest unless a message has the user role: the shim asks before the ensemble does."""
    if "user" not in roles:
        raise InvalidRequest(f"{where} has no message with role 'user'")


def read_options(tools: Any, kwargs: Any) -> TemplateOptions:
    """The template's extra inputs, checked: tools as OpenAI defines them, allowed kwargs."""
    if tools is not None:
        if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
            raise InvalidRequest(f"tools must be an array of at most {MAX_TOOLS} tools")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise InvalidRequest(f"tools[{index}].type must be 'function'")
            function = tool.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise InvalidRequest(f"tools[{index}].function.name must be a string")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise InvalidRequest("chat_template_kwargs must be an object")
        for key, value in kwargs.items():
            if key not in TEMPLATE_KWARGS:
                raise InvalidRequest(f"chat_template_kwargs.{key}: not allowed here; "
                                     f"allowed: {', '.join(TEMPLATE_KWARGS)}")
            if not isinstance(value, TEMPLATE_KWARGS[key]):
                raise InvalidRequest(f"chat_template_kwargs.{key} must be a {TEMPLATE_KWARGS[key].__name__}")
    return TemplateOptions(json.dumps(tools, ensure_ascii=False, sort_keys=True) if tools else "",
                           json.dumps(kwargs, sort_keys=True) if kwargs else "")


def read_conversation(data: Any, where: str = "messages") -> tuple[list[Turn], TemplateOptions]:
    """A conversation in either form (an array of messages, or the object with tools)."""
    if isinstance(data, dict):
        unknown = set(data) - {"messages", "tools", "chat_template_kwargs"}
        if unknown:
            raise InvalidRequest(f"{where}: unknown key {sorted(unknown)[0]!r}")
        return read_messages(data.get("messages"), where), read_options(data.get("tools"),
                                                                         data.get("chat_template_kwargs"))
    return read_messages(data, where), TemplateOptions()


def conversation_row(messages: list[dict], tools: list | None = None, template_kwargs: dict | None = None) -> str:
    """A conversation as the `messages` input carries it (the array alone when it can)."""
    if not tools and not template_kwargs:
        return json.dumps(messages, ensure_ascii=False)
    return json.dumps({"messages": messages, **({"tools": tools} if tools else {}),
                       **({"chat_template_kwargs": template_kwargs} if template_kwargs else {})}, ensure_ascii=False)


def messages_from_tensor(text: str, row: int) -> tuple[list[Turn], TemplateOptions]:
    where = f"messages[{row}]"
    return read_conversation(load_json(text, where, MAX_MESSAGES_CHARS), where)


def last_user_text(turns: Sequence[Turn]) -> str:
    return next(turn.text for turn in reversed(turns) if turn.role == "user")


def with_system_prompt(turns: Sequence[Turn], system_prompt: str) -> list[Turn]:
    """The conversation as the model sees it: the server's system prompt first when the
    caller sent none, as for a single question."""
    return list(turns) if any(turn.role == "system" for turn in turns) else [Turn("system", system_prompt), *turns]
