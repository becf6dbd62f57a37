"""Whole conversations: the ensemble's `messages` input, read and checked.

A row's `messages` is a JSON array of {"role", "content"} objects, as OpenAI clients send
them. Roles are system, developer (the system role by its newer name), user, assistant
and tool; every content is plain text, formatted by `chat.ChatFormatter` with each turn
isolated, so no turn can forge another role. Routing reads the last user turn.
"""
from __future__ import annotations

from typing import Any, Sequence

from .chat import Messages
from .contract import InvalidRequest
from .controls import load_json

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_TURNS = 256
MAX_MESSAGES_CHARS = 1_000_000  # the JSON text of one conversation; the model length bounds it further


def read_messages(items: Any, where: str = "messages") -> list[tuple[str, str]]:
    """[(role, text)] from a list of {"role", "content"}, or InvalidRequest naming the turn."""
    if not isinstance(items, list) or not items:
        raise InvalidRequest(f"{where} must be a non-empty array of messages")
    if len(items) > MAX_TURNS:
        raise InvalidRequest(f"{where} has {len(items)} messages; the limit is {MAX_TURNS}")
    turns = []
    for index, item in enumerate(items):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if role not in ROLES:
            raise InvalidRequest(f"{where}[{index}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}[{index}].content must be a string")
        turns.append((ROLES[role], content))
    if not any(role == "user" for role, _ in turns):
        raise InvalidRequest(f"{where} has no message with role 'user'")
    return turns


def messages_from_tensor(text: str, row: int) -> list[tuple[str, str]]:
    where = f"messages[{row}]"
    return read_messages(load_json(text, where, MAX_MESSAGES_CHARS), where)


def last_user_text(turns: Messages) -> str:
    return next(text for role, text in reversed(turns) if role == "user")


def with_system_prompt(turns: Sequence[tuple[str, str]], system_prompt: str) -> list[tuple[str, str]]:
    """The conversation as the model sees it: the server's system prompt first when the
    caller sent none, as for a single question."""
    return list(turns) if any(role == "system" for role, _ in turns) else [("system", system_prompt), *turns]
