"""OpenAI-compatible door on the shim: /v1/models, /v1/chat/completions, /v1/completions.

- Chat: the whole conversation goes to the ensemble (`messages`), rendered by the model's
  chat template with every turn isolated; routing reads the last user turn and clean-up
  applies, as on /predict (`"raw": true` skips both).
- Completions: the prompt as given, as `vllm serve` does: no template, routing or clean-up.
- Request controls reach vLLM: stop, seed, presence_penalty, logprobs/top_logprobs (at
  most 20), response_format (json_object, json_schema). Any other field is a 400 naming it.
- Sampling fields a client leaves out take the model's generation_config.json defaults
  over OpenAI's neutral ones (preprocess.sampling.model_sampling_defaults), not the judge's;
  a max_tokens over MAX_NEW_TOKENS_LIMIT is a 400 (/predict clips it).
- Chat messages carry names, tool turns and assistant tool calls; `tools`, `tool_choice`
  and `chat_template_kwargs` (an allow-list) reach the chat template (shim.tools).
- Thinking (`<think>...</think>`) comes back as `reasoning_content` when REASONING_PARSER
  is on: split by postprocess for whole answers, by preprocess.reasoning's splitter here
  for streams, both from the same rule.
- `n` choices are n rows of one batched request, under the same limits as /predict
  (prompts x n x max tokens).
- `stream: true` sends the tokens as vLLM makes them (server-sent events in OpenAI's
  chunk format, `[DONE]` last), through the decoupled `llm_stream` ensemble. One answer per
  stream (n=1, one prompt). Streamed chat text is the model's own: routing picks the token
  limit, but clean-up cannot take back text already sent, so it does not apply.
  `stream_options.include_usage` adds a last chunk with the usage. A refusal before the
  first token is an HTTP error as usual; a failure later is an `error` event, then the end.
  A client that disconnects aborts its generation.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from preprocess.contract import InvalidRequest
from preprocess.conversation import conversation_row, require_user_turn
from preprocess.reasoning import ParserUnavailable, Reasoning, thinking_off

from ..state import run_until_disconnect, shim_state
from ..bodies import ChatRequest, CompletionRequest, NamedToolChoice, OpenAIParams, json_body, parse_body
from ..ensemble import Answer
from ..errors import ApiError, openai_error_body
from ..render import HEAVY_REPLY_CHARS, json_reply
from ..streaming import Piece
from ..tools import AutoParser, plan as tool_plan

log = logging.getLogger("shim.openai")
router = APIRouter()


def usage(answers: list[Answer], prompts: int) -> dict[str, int]:
    """Prompt tokens once per distinct prompt (n copies share it), completion tokens for all."""
    per_prompt = len(answers) // max(prompts, 1)
    prompt_tokens = sum(a.prompt_tokens for a in answers[::per_prompt]) if answers else 0
    completion = sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def heavy(answers: list[Answer]) -> bool:
    """Replies worth building off the event loop: logprobs (dozens of objects per token),
    or much text."""
    return any(a.logprobs for a in answers) or sum(len(a.text) for a in answers) > HEAVY_REPLY_CHARS


def event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def merged(pieces: list[Piece]) -> Piece:
    """Pieces as one: the text and tokens of all, the last one's finish reason."""
    logprobs = [entry for piece in pieces for entry in piece.logprobs or ()] if pieces[0].logprobs is not None else None
    return Piece("".join(p.text for p in pieces), pieces[0].prompt_tokens, sum(p.completion_tokens for p in pieces),
                 pieces[-1].finish_reason, logprobs, tuple(i for p in pieces for i in p.token_ids))


async def streamed(request: Request, body: OpenAIParams, row: str, row_input: str, extra: dict[str, Any],
                   chunk: Callable[[Piece, bool], dict], head: dict[str, Any],
                   whole: bool = False) -> StreamingResponse:
    """SSE of one streamed answer: `chunk(piece, first)` makes each piece's chunk choice. The
    first piece is awaited before the response starts, so a refusal is still an HTTP error.
    `whole`: the pieces are held back and sent as one chunk at the end (keep-alive comments
    meanwhile), for answers read as a whole (tool calls)."""
    state = shim_state(request)
    overrides, work = await state.admit([row], {**state.openai_defaults(), **body.overrides(), **extra},
                                        row_input=row_input, verbatim=bool(extra.get("verbatim")))
    pieces = state.stream(row, overrides, work, row_input=row_input, texts=body.texts())
    first = await run_until_disconnect(request, anext(pieces))
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    keepalive_s = state.settings.shim.sse_keepalive_s

    async def events():
        piece, generated, waiting, held = first, 0, None, []
        try:
            while True:
                generated += piece.completion_tokens
                if whole:
                    held.append(piece)
                if not whole:
                    yield event({**head, "choices": [chunk(piece, piece is first)]})
                elif piece.finish_reason is not None:
                    yield event({**head, "choices": [chunk(merged(held), True)]})
                if piece.finish_reason is not None:
                    break
                # A comment line whenever the stream has been silent for SHIM_SSE_KEEPALIVE_S,
                # so that proxies and clients do not take a slow engine for a dead connection.
                waiting = asyncio.ensure_future(anext(pieces))
                while not (await asyncio.wait({waiting}, timeout=keepalive_s))[0]:
                    yield ": keep-alive\n\n"
                piece, waiting = waiting.result(), None
        except ApiError as exc:
            log.warning("stream ended by an error: %s", exc.message)
            yield event(openai_error_body(exc.status, exc.message, exc.param, exc.code))
        else:
            if include_usage:
                yield event({**head, "choices": [], "usage": {
                    "prompt_tokens": piece.prompt_tokens, "completion_tokens": generated,
                    "total_tokens": piece.prompt_tokens + generated}})
        finally:
            if waiting is not None:  # the client left while a piece was awaited
                waiting.cancel()
                await asyncio.gather(waiting, return_exceptions=True)
            await pieces.aclose()  # a client gone mid-stream: cancels the generation
        yield "data: [DONE]\n\n"

    # No caching and no proxy buffering: each event must reach the client as it is sent.
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def chat_logprobs(answer: Answer | Piece) -> dict | None:
    """OpenAI's chat form: per token its text, logprob, UTF-8 bytes and top alternatives."""
    if answer.logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", "replace"))}

    return {"content": [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}
                        for token, logprob, top in answer.logprobs]}


def completion_logprobs(answer: Answer | Piece) -> dict | None:
    """The legacy completions form: parallel lists, top alternatives as {token: logprob}."""
    if answer.logprobs is None:
        return None
    offsets, at = [], 0
    for token, _, _ in answer.logprobs:
        offsets.append(at)
        at += len(token)
    return {"tokens": [t for t, _, _ in answer.logprobs], "token_logprobs": [lp for _, lp, _ in answer.logprobs],
            "top_logprobs": [dict(top) for _, _, top in answer.logprobs], "text_offset": offsets}


def loaded_reasoning(state) -> Reasoning | None:
    """The reasoning split (REASONING_PARSER) with vLLM's parser imported, off the event
    loop; a parser the installed vLLM lacks is a 501 before any work is done."""
    reasoning = state.reasoning
    if reasoning is not None:
        try:
            reasoning.load()
        except ParserUnavailable as exc:
            log.warning("%s", exc)
            raise ApiError(501, str(exc), param="model") from None
    return reasoning


async def generate(request: Request, rows: list[str], params: OpenAIParams, row_input: str = "prompt",
                   extra: dict[str, Any] | None = None) -> list[Answer]:
    state = shim_state(request)
    extra = extra or {}
    overrides, work = await state.admit(rows, {**state.openai_defaults(), **params.overrides(), **extra},
                                        choices=params.n,
                                        row_input=row_input, verbatim=bool(extra.get("verbatim")))
    outputs = (("logprobs",) if overrides.get("top_logprobs") is not None else ()) + \
        (("prompt_ids",) if params.return_token_ids else ()) + \
        (("reasoning",) if overrides.get("split_reasoning") else ())
    if params.n > 1 and overrides.get("seed") is not None:
        # n choices under one seed are n samples, reproducible as a set: choice i gets seed + i.
        overrides = {**overrides, "seed": [choice_seed(overrides["seed"], k % params.n)
                                           for k in range(len(rows) * params.n)]}
    return await state.generate(request, [r for r in rows for _ in range(params.n)], overrides, work,
                                row_input=row_input, texts=params.texts(), outputs=outputs)


def choice_seed(seed: int, choice: int) -> int:
    """The seed of choice `choice` (seed + choice, within the seed's 0..2^63-1)."""
    return (seed + choice) % 2**63


def served_model(request: Request, asked: str | None) -> str:
    """The model's name, as /v1/models lists it; a request that names another gets a 404."""
    name = shim_state(request).settings.model_dir.name
    if asked is not None and asked != name:
        raise ApiError(404, f"the model {asked!r} does not exist here; this server serves {name!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    return name


@router.get("/v1/models")
async def models(request: Request):
    state = shim_state(request)
    max_len = (state.generator.read() or {}).get("max_model_len")
    return {"object": "list", "data": [{"id": state.settings.model_dir.name, "object": "model", "created": 0,
                                        "owned_by": "local", "max_model_len": max_len}]}


@router.post("/v1/chat/completions", openapi_extra=json_body(ChatRequest))
async def chat(request: Request):
    body: ChatRequest = await parse_body(request, ChatRequest)
    state = shim_state(request)
    model_name = served_model(request, body.model)
    try:
        require_user_turn([m.role for m in body.messages])
    except InvalidRequest as exc:
        raise ApiError(422, str(exc), param="messages") from None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    calls = tool_plan(tools, choice, body.response_format, body.parallel_tool_calls)
    forced = calls.response_format()
    if forced is not None:
        body = body.model_copy(update={"response_format": forced})
    parser = (AutoParser(state.settings.shim.tool_call_parser, state.counter.tokenizer, calls.tools)
              if calls.mode == "auto" and calls.calls_expected else None)
    if parser is not None:
        await asyncio.to_thread(parser.load)
    extra = {"raw": True} if calls.calls_expected else {}  # a call's JSON is the model's own: no routing, no clean-up
    reasoning = await asyncio.to_thread(loaded_reasoning, state)
    if reasoning is not None:
        extra["split_reasoning"] = True
    thinking_disabled = thinking_off(body.chat_template_kwargs)
    conversation = conversation_row([m.as_dict(i) for i, m in enumerate(body.messages)], tools,
                                    body.chat_template_kwargs)
    body.check_stream(1)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def message(text: str, finish_reason: str | None, thought: str | None) -> tuple[dict, str | None]:
        content, tool_calls, finish = calls.read(text, finish_reason, parser)
        said = {"role": "assistant", "content": content, **({"tool_calls": tool_calls} if tool_calls else {})}
        if reasoning is not None:
            said["reasoning_content"] = thought or None
        return said, finish

    if body.stream:
        opened = reasoning is not None and state.counter.opens_reasoning(conversation, state.system_prompt, "messages")
        splitter = reasoning.stream(opened, thinking_disabled) if reasoning is not None else None

        def chat_chunk(piece: Piece, first: bool) -> dict:
            if calls.calls_expected:  # one chunk, the whole answer read (see streamed's `whole`)
                thought, text = (reasoning.split(piece.text, opened, thinking_disabled) if reasoning is not None
                                 else (None, piece.text))
                delta, finish = message(text, piece.finish_reason, thought)
                delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(delta.get("tool_calls", ()))]
                if not delta["tool_calls"]:
                    del delta["tool_calls"]
                return {"index": 0, "delta": delta, "logprobs": chat_logprobs(piece), "finish_reason": finish}
            delta = {"role": "assistant"} if first else {}
            if splitter is not None:
                thought, text = splitter.feed(piece.text, piece.token_ids)
                if piece.finish_reason is not None:
                    rest_thought, rest_text = splitter.finish()
                    thought, text = thought + rest_thought, text + rest_text
                if thought:
                    delta["reasoning_content"] = thought
                if text or not thought:
                    delta["content"] = text
            else:
                delta["content"] = piece.text
            return {"index": 0, "delta": delta, "logprobs": chat_logprobs(piece), "finish_reason": piece.finish_reason}

        head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name}
        return await streamed(request, body, conversation, "messages", extra, chat_chunk, head,
                              whole=calls.calls_expected)
    answers = await generate(request, [conversation], body, row_input="messages", extra=extra)

    def reply() -> dict:
        extra_fields = {"prompt_token_ids": answers[0].prompt_ids} if body.return_token_ids else {}
        choices = []
        for i, a in enumerate(answers):
            said, finish = message(a.text, a.finish_reason, a.reasoning)
            choices.append({"index": i, "message": said, "logprobs": chat_logprobs(a), "finish_reason": finish})
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(answers, 1), **extra_fields}

    return await json_reply(reply, heavy(answers))


@router.post("/v1/completions", openapi_extra=json_body(CompletionRequest))
async def completions(request: Request):
    body: CompletionRequest = await parse_body(request, CompletionRequest)
    model_name = served_model(request, body.model)
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
    body.check_stream(len(prompts))
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        def completion_chunk(piece: Piece, first: bool) -> dict:
            return {"index": 0, "text": piece.text, "finish_reason": piece.finish_reason,
                    "logprobs": completion_logprobs(piece)}

        head = {"id": ident, "object": "text_completion", "created": created, "model": model_name}
        return await streamed(request, body, prompts[0], "prompt", {"verbatim": True}, completion_chunk, head)
    answers = await generate(request, prompts, body, extra={"verbatim": True})

    def reply() -> dict:
        choices = [{"index": i, "text": a.text, "finish_reason": a.finish_reason,
                    "logprobs": completion_logprobs(a),
                    **({"prompt_token_ids": a.prompt_ids} if body.return_token_ids else {})}
                   for i, a in enumerate(answers)]
        return {"id": ident, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(answers, len(prompts))}

    return await json_reply(reply, heavy(answers))
