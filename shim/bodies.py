"""Request bodies the routes parse themselves (to answer 400/422 naming the field at fault,
whatever the content-type), and their schema in the OpenAPI document, which FastAPI cannot
infer from a handler that reads `Request` (schemathesis and clients read it)."""
from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra})


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`, whatever the content-type; errors name the field at fault."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"invalid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(422, describe_validation(exc.errors())) from None


def describe_validation(errors: list[dict]) -> str:
    """One line naming the field (and list index) at fault."""
    problems = []
    for item in errors:
        location = [str(p) for p in item.get("loc", ()) if p not in ("body", "str", "list[str]")]
        where = location[0] + "".join(f"[{p}]" for p in location[1:]) if location else "body"
        problems.append(f"{where}: {item.get('msg')}")
    return "; ".join(dict.fromkeys(problems)) or "invalid request"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` with parse_body (definitions inlined)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
