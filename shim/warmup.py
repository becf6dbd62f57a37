"""Warm-up prompts: the configured one plus samples from a local data file.

A missing or broken file means no data warm-up and one log line, never a failed start.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from preprocess.settings import WarmupSettings

log = logging.getLogger("warmup")

USER_TEXT_FIELDS = ("instruction", "prompt", "question", "query", "input")


def user_text(record: Any) -> str | None:
    if isinstance(record, str):
        return record.strip() or None
    if not isinstance(record, dict):
        return None
    messages = record.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
                return message["content"].strip() or None
    for name in USER_TEXT_FIELDS:
        value = record.get(name)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _records(path: Path) -> Iterable[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line in text.splitlines():
            if line.strip():
                yield json.loads(line)
        return
    data = json.loads(text)
    if isinstance(data, dict):
        data = data.get("data", [])
    if not isinstance(data, list):
        raise ValueError("expected a list or {\"data\": [...]}")
    yield from data


def load_user_prompts(path: Path, limit: int) -> list[str]:
    if limit <= 0:
        return []
    if not path.is_file():
        log.info("no warm-up data at %s; warming up with the prompt only", path)
        return []
    prompts: list[str] = []
    try:
        for record in _records(path):
            text = user_text(record)
            if text:
                prompts.append(text)
            if len(prompts) >= limit:
                break
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        log.warning("warm-up data %s unreadable (%s); warming up with the prompt only", path, exc)
        return []
    return prompts


def warmup_prompts(settings: WarmupSettings) -> list[str]:
    """What the warm-up sends, in order: the prompt, then the samples, `repeat` times."""
    once = [settings.prompt] + load_user_prompts(settings.data_path, settings.num_samples)
    return once * settings.repeat
