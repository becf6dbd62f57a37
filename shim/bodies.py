"""Every request body the shim accepts, how it is read, and the limits it must meet.

Reading (`parse_body`): only `application/json` (415 otherwise: a browser can send
text/plain or a form cross-site without a preflight, never JSON), at most
`JSON_MAX_DEPTH` levels deep and UTF-8 text in every string (400 naming the field), then
the model with strict types (422: `"4"` is not an integer, `"yes"` is not a boolean); a
large body is read on a worker thread. Then `Limits.admit` checks the per-request settings
against `preprocess.contract` (400 naming the field and its range) and the number of rows
(413); the work a request asks for is counted in shim.budget. The schemas also go into the
OpenAPI document (`json_body`), which FastAPI cannot infer from a handler that reads
`Request` itself.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.requests import ClientDisconnect

from preprocess import controls
from preprocess.contract import (MAX_CHOICES, MAX_NEW_TOKENS_LIMIT, InvalidRequest, OutOfRange, check_settings,
                                 clip_new_tokens)
from preprocess.conversation import ROLES

from .errors import ApiError, ClientGone

JSON_MAX_DEPTH = 32
Number = StrictFloat | StrictInt


class SamplingFields(BaseModel):
    """Per-request generation settings; ranges are checked against the contract table."""
    model_config = ConfigDict(extra="ignore")
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None
    repetition_penalty: Number | None = None
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None

    def sampling(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SamplingFields.model_fields if getattr(self, name) is not None}


class PredictRequest(SamplingFields):
    prompt: StrictStr | list[StrictStr]
    max_new_tokens: StrictInt | None = None
    ignore_eos: StrictBool | None = None  # benchmarks: fixed-length generation

    def prompts(self) -> list[str]:
        return self.prompt if isinstance(self.prompt, list) else [self.prompt]

    def overrides(self) -> dict[str, Any]:
        return {**self.sampling(), "max_new_tokens": self.max_new_tokens, "ignore_eos": self.ignore_eos}


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    max_new_tokens: StrictInt | None = None
    raw: StrictBool | None = None

    def overrides(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "raw": self.raw}


class SystemPromptRequest(BaseModel):
    system_prompt: StrictStr


class TextPart(BaseModel):
    """One part of a message's content, as OpenAI defines them; only text parts are served."""
    model_config = ConfigDict(extra="ignore")
    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(min_length=1, max_length=64)
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None  # the parameters are always enforced on forced calls


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: dict[str, StrictStr]


RoleName = Literal[tuple(ROLES)]  # the roles preprocess.conversation reads, written once


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: RoleName
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_call_id: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None

    def as_dict(self, index: int) -> dict[str, Any]:
        """The message as the ensemble's `messages` carries it (preprocess.conversation)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text(index)}
        for name in ("name", "tool_call_id"):
            if getattr(self, name) is not None:
                message[name] = getattr(self, name)
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message

    def text(self, index: int) -> str | None:
        """The content as one text: a list of text parts joined by newlines (as vLLM joins
        them), or ApiError 400 naming a part of another type."""
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return None
            raise ApiError(400, f"messages[{index}].content: only an assistant turn with tool_calls may have none",
                           param=f"messages[{index}].content")
        if isinstance(self.content, str):
            return self.content
        texts = []
        for number, part in enumerate(self.content):
            where = f"messages[{index}].content[{number}]"
            if part.type != "text":
                raise ApiError(400, f"{where}.type: {part.type!r} parts are not served here; only 'text'",
                               param=f"{where}.type")
            if part.text is None:
                raise ApiError(400, f"{where}.text: a text part needs its text", param=f"{where}.text")
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False  # a last chunk with the usage and no choices


class OpenAIParams(SamplingFields):
    # A field this server does not implement (logit_bias, echo, functions...) is refused by
    # name, never ignored: a client must not believe it was applied.
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    user: StrictStr | None = None  # the caller's end-user id: metadata, no effect on generation
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    raw: StrictBool = False  # skip routing and clean-up
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    return_token_ids: StrictBool = False  # vLLM's extension: the prompt's token ids in the reply
    ignore_eos: StrictBool | None = None  # vLLM's extension: generate to the token limit

    def top_logprobs_wanted(self) -> int | None:
        return None

    def check_stream(self, prompts: int) -> None:
        """A stream is one answer: one prompt, one choice; stream_options only with stream."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed with stream: true")
        if self.stream and self.n * prompts != 1:
            raise ApiError(400, f"stream: streams one answer; n={self.n} with {prompts} prompt(s) asks for "
                                f"{self.n * prompts} (set n to 1 and send one prompt)")
        if self.stream and self.return_token_ids:
            raise ApiError(400, "return_token_ids: not available with stream: true")

    def overrides(self) -> dict[str, Any]:
        """The request's own settings. A token limit over MAX_NEW_TOKENS_LIMIT is a 400 here,
        not clipped as on /predict: a client is told."""
        for name in ("max_completion_tokens", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value > MAX_NEW_TOKENS_LIMIT:
                raise ApiError(400, f"{name}: {value} is over this server's limit of {MAX_NEW_TOKENS_LIMIT} "
                                    "new tokens", param=name)
        return {**self.sampling(), "max_new_tokens": self.max_completion_tokens or self.max_tokens,
                "raw": self.raw or None, "seed": self.seed, "top_logprobs": self.top_logprobs_wanted(),
                "ignore_eos": self.ignore_eos}

    def texts(self) -> dict[str, str]:
        """The text controls as the ensemble takes them, or ApiError 400 naming the problem."""
        try:
            stops = controls.stop_strings(self.stop)
            controls.structured_output(self.response_format)
        except InvalidRequest as exc:
            raise ApiError(400, str(exc)) from None
        return {"stop": controls.stop_to_tensor(stops),
                "response_format": json.dumps(self.response_format) if self.response_format else ""}


class ChatRequest(OpenAIParams):
    messages: list[Message] = Field(min_length=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    tools: list[Tool] | None = Field(default=None, max_length=64)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # required may call several tools; a named choice calls one
    chat_template_kwargs: dict[str, Any] | None = None  # checked against preprocess.conversation.TEMPLATE_KWARGS

    def top_logprobs_wanted(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(OpenAIParams):
    prompt: StrictStr | list[StrictStr]
    logprobs: StrictInt | None = None  # the legacy API's form: how many top tokens per position

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


def json_path(parts: tuple) -> str:
    """`messages[0].content` for ("messages", 0, "content"), always valid UTF-8: a key that
    is not appears escaped (`\\ud800`)."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            name = str(part).encode("utf-8", "backslashreplace").decode("utf-8")
            text += f".{name}" if text else name
    return text or "body"


def json_problem(data: Any, limit: int) -> str | None:
    """Why parsed JSON cannot be served: nesting deeper than `limit`, or a string (a key or
    a value, anywhere) that is not UTF-8 text: JSON allows lone surrogates ("\\ud800"),
    which no later stage can encode. Iterative: no recursion for a hostile depth."""
    stack: list[tuple[Any, int, tuple]] = [(data, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    return f"{json_path(path)} is not valid UTF-8 text (a lone surrogate)"
        elif isinstance(node, (list, dict)):
            if depth > limit:
                return f"invalid JSON: nested more than {limit} levels deep"
            if isinstance(node, dict):
                for key, value in node.items():
                    stack.append((key, depth, path + (f"{key} (a key)",)))
                    stack.append((value, depth + 1, path + (key,)))
            else:
                stack.extend((value, depth + 1, path + (index,)) for index, value in enumerate(node))
    return None


# Bodies larger than this are decoded and validated on a worker thread: an 8 MiB list of
# prompts takes the event loop about a second, and every other client would wait for it.
OFF_LOOP_BODY_BYTES = 64 * 1024


def decode_body(raw: bytes, model: type[BaseModel]):
    """The body as `model`, or ApiError naming the problem (see parse_body)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"invalid JSON: nested more than {JSON_MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON: {exc}") from None
    problem = json_problem(data, JSON_MAX_DEPTH)
    if problem is not None:
        raise ApiError(400, problem)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        unsupported = [".".join(str(p) for p in e["loc"]) for e in errors if e.get("type") == "extra_forbidden"]
        if unsupported and len(unsupported) == len(errors):
            raise ApiError(400, f"unsupported field{'s' if len(unsupported) > 1 else ''} "
                                f"{', '.join(unsupported)}: this server does not implement "
                                f"{'them' if len(unsupported) > 1 else 'it'}", param=unsupported[0]) from None
        raise ApiError(422, describe_validation(errors), param=field_at_fault(errors)) from None


async def parse_body(request: Request, model: type[BaseModel]):
    """The JSON body as `model`; errors name the field at fault."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"the body must be application/json, got {media_type or 'no content-type'!r}")
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone() from None
    if len(raw) > OFF_LOOP_BODY_BYTES:
        return await asyncio.to_thread(decode_body, raw, model)
    return decode_body(raw, model)


def error_location(item: dict) -> str:
    """`messages[0].content`-style: the field (and list index) of one validation error."""
    location = [str(p) for p in item.get("loc", ()) if p not in ("body", "str", "list[str]", "int", "float")]
    return location[0] + "".join(f"[{p}]" for p in location[1:]) if location else "body"


def describe_validation(errors: list[dict]) -> str:
    """One line naming the field (and list index) at fault."""
    problems = [f"{error_location(item)}: {item.get('msg')}" for item in errors]
    return "; ".join(dict.fromkeys(problems)) or "invalid request"


def field_at_fault(errors: list[dict]) -> str | None:
    """The first field at fault, OpenAI's `param`."""
    return error_location(errors[0]) if errors else None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: SHIM_MAX_BATCH_PROMPTS rows, and SHIM_MAX_REQUEST_TOKENS
    of work (shim.budget), where a request with no token limit of its own is counted at
    the largest routing limit."""
    max_batch_prompts: int
    max_request_tokens: int
    default_max_tokens: int

    def admit(self, overrides: dict[str, Any], prompts: int, choices: int = 1) -> dict[str, Any]:
        """The overrides as the ensemble gets them (max_new_tokens clipped to 1..4096, the
        judge routes' contract), or ApiError naming what is out of range or over a limit."""
        values = {k: v for k, v in overrides.items() if v is not None}
        if "max_new_tokens" in values:
            values["max_new_tokens"] = clip_new_tokens(values["max_new_tokens"])
        try:
            check_settings(values)
        except OutOfRange as exc:
            raise ApiError(400, str(exc)) from None
        rows = prompts * choices
        if rows > self.max_batch_prompts:
            raise ApiError(413, f"the request has {rows} prompts (x choices); the limit is "
                                f"{self.max_batch_prompts} (SHIM_MAX_BATCH_PROMPTS)")
        return values

    def new_tokens(self, values: dict[str, Any]) -> int:
        return values.get("max_new_tokens", self.default_max_tokens)


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
