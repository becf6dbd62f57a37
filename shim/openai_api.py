"""OpenAI-compatible door on the shim: /v1/models, /v1/chat/completions, /v1/completions.

Messages go through the same ensemble as /predict (routing, chat template, clean-up);
`"raw": true` skips routing and clean-up. `n` choices are n rows of one batched request.
`stream: true` is answered as server-sent events in the OpenAI chunk format; the ensemble
is not decoupled, so the answer arrives as one content chunk once it is complete.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from .bodies import error, json_body, parse_body
from .ensemble import Answer, EnsembleError

MAX_CHOICES = 16


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr


class CommonParams(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    top_k: int | None = None
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(default=None, allow_inf_nan=False)
    stream: bool = False
    raw: bool = False  # skip routing and clean-up

    def overrides(self) -> dict[str, Any]:
        limit = self.max_completion_tokens or self.max_tokens
        values = {"max_new_tokens": min(limit, 4096) if limit else None, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "frequency_penalty": self.frequency_penalty,
                  "repetition_penalty": self.repetition_penalty, "raw": self.raw or None}
        return {k: v for k, v in values.items() if v is not None}


class ChatRequest(CommonParams):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(CommonParams):
    prompt: StrictStr | list[StrictStr]


def usage(answers: list[Answer], prompts: int) -> dict[str, int]:
    """Prompt tokens once per distinct prompt (n copies share it), completion tokens for all."""
    per_prompt = len(answers) // max(prompts, 1)
    prompt_tokens = sum(a.prompt_tokens for a in answers[::per_prompt]) if answers else 0
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(chunks: list[dict]) -> StreamingResponse:
    async def events():
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def build_router(state, model_name: str) -> APIRouter:
    router = APIRouter()

    async def generate(prompts: list[str], system: str, params: CommonParams) -> list[Answer]:
        rows = [p for p in prompts for _ in range(params.n)]
        return await state.client.generate(rows, system, params.overrides())

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
    async def chat(request: Request):
        body: ChatRequest = await parse_body(request, ChatRequest)
        users = [m.content for m in body.messages if m.role == "user"]
        if not users:
            return error(422, "messages: no message with role 'user'")
        systems = [m.content for m in body.messages if m.role == "system"]
        try:
            answers = await generate([users[-1]], systems[-1] if systems else state.system_prompt, body)
        except EnsembleError as exc:
            return error(exc.status, exc.message)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name}
            chunks = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": a.text},
                                            "finish_reason": None}]} for i, a in enumerate(answers)]
            chunks += [{**head, "choices": [{"index": i, "delta": {}, "finish_reason": a.finish_reason}]}
                       for i, a in enumerate(answers)]
            return sse(chunks)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": a.finish_reason} for i, a in enumerate(answers)],
                "usage": usage(answers, 1)}

    @router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
    async def completions(request: Request):
        body: CompletionRequest = await parse_body(request, CompletionRequest)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        try:
            answers = await generate(prompts, state.system_prompt, body)
        except EnsembleError as exc:
            return error(exc.status, exc.message)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
                   for i, a in enumerate(answers)]
        if body.stream:
            head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
            return sse([{**head, "choices": [choice]} for choice in choices])
        return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(answers, len(prompts))}

    return router
