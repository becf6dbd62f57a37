"""OpenAI-compatible door on the shim: /v1/models, /v1/chat/completions, /v1/completions.

Messages go through the same ensemble as /predict (routing, chat template, clean-up);
`"raw": true` skips routing and clean-up. `n` choices are n rows of one batched request,
under the same limits as /predict (prompts x n x max tokens). `stream: true` is answered
as server-sent events in the OpenAI chunk format; the ensemble is not decoupled, so the
answer arrives as one content chunk once it is complete.
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..state import shim_state
from ..bodies import ChatRequest, CompletionRequest, OpenAIParams, json_body, parse_body
from ..ensemble import Answer
from ..errors import ApiError

router = APIRouter()


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


async def generate(request: Request, prompts: list[str], params: OpenAIParams, system_prompt: str | None = None,
                   field: str = "prompt", indexed: bool = True) -> list[Answer]:
    state = shim_state(request)
    overrides = state.limits.admit(prompts, params.overrides(), choices=params.n, field=field, indexed=indexed)
    rows = [p for p in prompts for _ in range(params.n)]
    return await state.generate(request, rows, overrides, system_prompt)


@router.get("/v1/models")
async def models(request: Request):
    name = shim_state(request).settings.model_dir.name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]}


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
async def chat(request: Request):
    body: ChatRequest = await parse_body(request, ChatRequest)
    model_name = shim_state(request).settings.model_dir.name
    users = [m.content for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(422, "messages: no message with role 'user'")
    systems = [m.content for m in body.messages if m.role == "system"]
    answers = await generate(request, [users[-1]], body, systems[-1] if systems else None,
                             field="messages: the last user message", indexed=False)
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
    model_name = shim_state(request).settings.model_dir.name
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    answers = await generate(request, prompts, body, indexed=isinstance(body.prompt, list))
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": None}
               for i, a in enumerate(answers)]
    if body.stream:
        head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
        return sse([{**head, "choices": [choice]} for choice in choices])
    return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
            "choices": choices, "usage": usage(answers, len(prompts))}
