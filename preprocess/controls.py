"""Request controls that are text, not numbers: stop strings and the response format.

Both travel through the ensemble as JSON text (one string per row), so a Triton client
can send them; the shim sends the same. `stop_strings` and `structured_output` check
the values, and give them in the one form the generator reads:
- STOP: a JSON array of strings;
- RESPONSE_FORMAT: the keyword arguments of vLLM's `StructuredOutputsParams` as a JSON
  object (`{"json": schema}` or `{"json_object": true}`), "" for free text.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .contract import InvalidRequest
from .grammar.limits import check_schema_cost

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_RESPONSE_FORMAT_CHARS = 32_000  # a schema is compiled into a grammar: bound that work
STRUCTURED_KEYS = ("json", "json_object")


def load_json(text: str, what: str, limit: int) -> Any:
    """JSON text from a tensor, or InvalidRequest naming `what` (too long, too deep, not JSON)."""
    if len(text) > limit:
        raise InvalidRequest(f"{what} has {len(text)} characters; the limit is {limit}")
    try:
        return json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None


def stop_strings(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """The request's stop strings (a string is one), checked."""
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop has {len(stops)} strings; the limit is {MAX_STOP_STRINGS}")
    for index, stop in enumerate(stops):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidRequest(f"stop[{index}] must have 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
    return tuple(dict.fromkeys(stops))


def stop_from_tensor(text: str) -> tuple[str, ...]:
    return stop_strings(load_json(text, "stop", MAX_STOP_STRINGS * (MAX_STOP_CHARS * 6 + 4) + 2)) if text else ()


def stop_to_tensor(stops: Sequence[str]) -> str:
    return json.dumps(list(stops), ensure_ascii=False) if stops else ""


def structured_output(response_format: Mapping[str, Any] | None) -> str:
    """An OpenAI `response_format` as the generator's RESPONSE_FORMAT ("" for free text)."""
    if response_format is None:
        return ""
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return ""
    if kind == "json_object":
        return json.dumps({"json_object": True})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object")
        check_schema_cost(schema)
        canonical = json.dumps({"json": schema}, ensure_ascii=False, sort_keys=True)
        if len(canonical) > MAX_RESPONSE_FORMAT_CHARS:
            raise InvalidRequest(f"response_format's schema has {len(canonical)} characters; "
                                 f"the limit is {MAX_RESPONSE_FORMAT_CHARS}")
        return canonical
    raise InvalidRequest(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def structured_output_from_tensor(text: str) -> str:
    """The ensemble's `response_format` input (OpenAI's object as JSON) in the generator's form."""
    return structured_output(load_json(text, "response_format", MAX_RESPONSE_FORMAT_CHARS)) if text else ""


def structured_output_kwargs(text: str) -> dict[str, Any] | None:
    """The generator's RESPONSE_FORMAT as StructuredOutputsParams keyword arguments, checked
    again: a client may call the generator directly."""
    if not text:
        return None
    kwargs = load_json(text, "RESPONSE_FORMAT", MAX_RESPONSE_FORMAT_CHARS + 16)
    if not isinstance(kwargs, dict) or len(kwargs) != 1 or next(iter(kwargs)) not in STRUCTURED_KEYS:
        raise InvalidRequest('RESPONSE_FORMAT must be {"json": schema} or {"json_object": true}')
    if "json" in kwargs and not isinstance(kwargs["json"], dict):
        raise InvalidRequest("RESPONSE_FORMAT's json schema must be an object")
    if "json" in kwargs:
        check_schema_cost(kwargs["json"], "RESPONSE_FORMAT's schema")
    return kwargs
