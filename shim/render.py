"""JSON replies that never hold the event loop: a large reply is built and serialized on a
worker thread, and serialized piece by piece, so the thread lets the loop run between
pieces (one json.dumps of a 50 MB reply would hold the interpreter for its whole length,
thread or not)."""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

from fastapi.responses import JSONResponse, Response

HEAVY_REPLY_CHARS = 256 * 1024  # replies with more answer text than this are made off the loop
# Containers are walked down to this depth, and longer lists element by element; below
# that, each piece is one json.dumps call of bounded size.
WALK_DEPTH = 4
WALK_LIST_ITEMS = 32


def _dumps(node: Any) -> str:
    return json.dumps(node, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def render_json(node: Any) -> bytes:
    """The same JSON text JSONResponse makes, built from many small json.dumps calls."""
    parts: list[str] = []
    stack: list[tuple[Any, int] | str] = [(node, 0)]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
            continue
        value, depth = item
        if isinstance(value, list) and (depth < WALK_DEPTH or len(value) > WALK_LIST_ITEMS):
            pieces: list[tuple[Any, int] | str] = ["["]
            for index, child in enumerate(value):
                pieces += [","] if index else []
                pieces.append((child, depth + 1))
            stack.extend(reversed(pieces + ["]"]))
        elif isinstance(value, dict) and depth < WALK_DEPTH:
            pieces = ["{"]
            for index, (key, child) in enumerate(value.items()):
                pieces.append(("," if index else "") + _dumps(str(key)) + ":")
                pieces.append((child, depth + 1))
            stack.extend(reversed(pieces + ["}"]))
        else:
            parts.append(_dumps(value))
    return "".join(parts).encode("utf-8")


async def json_reply(build: Callable[[], dict], heavy: bool) -> Response:
    """`build()` as a JSON response; when `heavy`, built and rendered off the event loop."""
    if not heavy:
        return JSONResponse(build())
    body = await asyncio.to_thread(lambda: render_json(build()))
    return Response(body, media_type="application/json")
