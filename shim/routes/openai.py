"""OpenAI-compatible door on the shim: /v1/models, /v1/chat/completions, /v1/completions.

- Chat: the whole conversation goes to the ensemble (`messages`), rendered by the model's
  chat template with every turn isolated; routing reads the last user turn and clean-up
  applies, as on /predict (`"raw": true` skips both).
- Completions: the prompt as given, as `vllm serve` does: no template, routing or clean-up.
- Request controls reach vLLM: stop, seed, presence_penalty, logprobs/top_logprobs (at
  most 20), response_format (json_object, json_schema). Any other field is a 400 naming it.
- `n` choices are n rows of one batched request, under the same limits as /predict
  (prompts x n x max tokens).
- `stream: true` is answered as server-sent events in the OpenAI chunk format, but the
  ensemble is not decoupled: the answer arrives as one content chunk once it is complete.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..state import shim_state
from ..bodies import ChatRequest, CompletionRequest, OpenAIParams, first_non_text, json_body, parse_body
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


def chat_logprobs(answer: Answer) -> dict | None:
    """OpenAI's chat form: per token its text, logprob, UTF-8 bytes and top alternatives."""
    if answer.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                        for token, logprob, top in answer.logprobs]}


def completion_logprobs(answer: Answer) -> dict | None:
    """The legacy completions form: parallel lists, top alternatives as {token: logprob}."""
    if answer.logprobs is None:
        return None
    offsets, at = [], 0
    for token, _, _ in answer.logprobs:
        offsets.append(at)
        at += len(token)
    return {"tokens": [t for t, _, _ in answer.logprobs], "token_logprobs": [lp for _, lp, _ in answer.logprobs],
            "top_logprobs": [dict(top) for _, _, top in answer.logprobs], "text_offset": offsets}


async def generate(request: Request, rows: list[str], params: OpenAIParams, field: str, indexed: bool,
                   row_input: str = "prompt", extra: dict[str, Any] | None = None) -> list[Answer]:
    state = shim_state(request)
    overrides = state.limits.admit(rows, {**params.overrides(), **(extra or {})}, choices=params.n,
                                   field=field, indexed=indexed)
    outputs = (("logprobs",) if overrides.get("top_logprobs") is not None else ()) + \
        (("prompt_ids",) if params.return_token_ids else ())
    return await state.generate(request, [r for r in rows for _ in range(params.n)], overrides,
                                row_input=row_input, texts=params.texts(), outputs=outputs)


@router.get("/v1/models")
async def models(request: Request):
    name = shim_state(request).settings.model_dir.name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]}


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
async def chat(request: Request):
    body: ChatRequest = await parse_body(request, ChatRequest)
    model_name = shim_state(request).settings.model_dir.name
    if not any(m.role == "user" for m in body.messages):
        raise ApiError(422, "messages: no message with role 'user'")
    broken = first_non_text([m.content for m in body.messages])
    if broken is not None:
        raise ApiError(400, f"messages[{broken}].content is not valid UTF-8 text (a lone surrogate)")
    conversation = json.dumps([{"role": m.role, "content": m.content} for m in body.messages], ensure_ascii=False)
    answers = await generate(request, [conversation], body, field="messages", indexed=False, row_input="messages")
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    extra = {"prompt_token_ids": answers[0].prompt_ids} if body.return_token_ids else {}
    if body.stream:
        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name}
        chunks = [{**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": a.text},
                                        "logprobs": chat_logprobs(a), "finish_reason": None}]}
                  for i, a in enumerate(answers)]
        chunks += [{**head, "choices": [{"index": i, "delta": {}, "finish_reason": a.finish_reason}]}
                   for i, a in enumerate(answers)]
        return sse(chunks)
    return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": a.text},
                         "logprobs": chat_logprobs(a), "finish_reason": a.finish_reason}
                        for i, a in enumerate(answers)],
            "usage": usage(answers, 1), **extra}


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    model_name = shim_state(request).settings.model_dir.name
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    answers = await generate(request, prompts, body, field="prompt", indexed=isinstance(body.prompt, list),
                             extra={"verbatim": True})
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason, "logprobs": completion_logprobs(a),
                **({"prompt_token_ids": a.prompt_ids} if body.return_token_ids else {})}
               for i, a in enumerate(answers)]
    if body.stream:
        head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
        return sse([{**head, "choices": [choice]} for choice in choices])
    return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
            "choices": choices, "usage": usage(answers, len(prompts))}
