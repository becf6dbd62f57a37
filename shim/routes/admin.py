"""What operators read and change: `/info`, the run-time system prompt, `/metrics`."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request

from preprocess import settings as cfg

from ..bodies import SystemPromptRequest, json_body, parse_body
from ..ensemble import EnsembleError
from ..errors import ApiError
from ..state import shim_state

router = APIRouter()


@router.get("/info")
async def info(request: Request):
    """The engine as the generator reports it (its state file), and the shim's settings."""
    state = shim_state(request)
    settings = state.settings
    generator = state.generator.read() or {}
    routing = settings.routing
    return {
        "backend": generator.get("backend"),
        "engine_fallback": generator.get("engine_fallback"),  # why transformers serves, when vLLM was asked for
        "vllm_version": generator.get("vllm_version"),
        "engine_mode": generator.get("engine_mode"),
        "frontend": generator.get("frontend"),  # where each replica's AsyncLLM runs: process or thread
        "model_dir": generator.get("model_dir") or str(settings.model_dir),
        "engine_args": generator.get("engine_kwargs", {}),
        "scheduler": generator.get("scheduler", {}),
        "engine_restarts": generator.get("restarts", 0),
        "tensor_parallel_size": generator.get("tensor_parallel_size"),
        # each engine replica: its index, GPUs, readiness, backend, engine and front-end pids, restarts
        "replicas": generator.get("replicas", []),
        "triton_url": state.client.url,
        "ready": state.ready,
        "batch_mode": state.batch_mode,
        "routing": {
            "disabled": routing.disabled,
            "max_new_tokens": routing.max_new_tokens,
            "max_new_tokens_code_soft": routing.max_new_tokens_code_soft,
            "max_new_tokens_code": routing.max_new_tokens_code,
            "max_new_tokens_code_hard": routing.max_new_tokens_code_hard,
        },
        "sampling_defaults": dataclasses.asdict(settings.sampling),
        "limits": {
            "max_batch_prompts": state.limits.max_batch_prompts,
            "max_request_tokens": state.limits.max_request_tokens,
            "max_queued_tokens": state.ledger.limit,
            "grammar_check_memory_mb": settings.grammar.check_memory_mb,
            "grammar_check_timeout_s": settings.grammar.check_timeout_s,
            "max_body_bytes": settings.shim.max_body_bytes,
            "max_header_bytes": settings.shim.max_header_bytes,
            "header_timeout_s": settings.shim.header_timeout_s,
            "body_timeout_s": settings.shim.body_timeout_s,
        },
        "system_prompt_chars": len(state.system_prompt),
        "env": dict(settings.public_environment),
    }


@router.get("/system_prompt")
async def get_system_prompt(request: Request):
    return {"system_prompt": shim_state(request).system_prompt}


# Room a system prompt must leave in the model length, beside the largest routing limit:
# a question of this many tokens must still fit.
QUESTION_ROOM_TOKENS = 256
PROBE_QUESTION = "hi"


@router.post("/system_prompt", openapi_extra=json_body(SystemPromptRequest))
async def set_system_prompt(request: Request):
    """Takes effect for the next request; each request carries exactly one prompt. Stored
    only once a test prompt with it has gone through the chat template and leaves room to
    ask and answer, so no value can make every later request fail. "" restores the default."""
    state = shim_state(request)
    body = await parse_body(request, SystemPromptRequest)
    try:
        wanted = cfg.validate_system_prompt(body.system_prompt) or state.settings.chat.system_prompt
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    try:
        probe = await state.client.explain(PROBE_QUESTION, wanted, {"max_new_tokens": 1})
    except EnsembleError as exc:
        if exc.status < 500:
            raise ApiError(422, f"system_prompt: a test prompt with it fails, so it was not stored: {exc.message}") \
                from None
        raise ApiError(503, f"system_prompt: cannot test it now ({exc.message}); not stored, retry shortly") from None
    max_model_len = (state.generator.read() or {}).get("max_model_len")
    needed = probe["prompt_tokens"] + state.limits.default_max_tokens + QUESTION_ROOM_TOKENS
    if max_model_len and needed > max_model_len:
        raise ApiError(422, f"system_prompt: with it a prompt starts at {probe['prompt_tokens']} tokens, which leaves "
                            f"no room for a {QUESTION_ROOM_TOKENS}-token question and a "
                            f"{state.limits.default_max_tokens}-token answer in the model length of "
                            f"{max_model_len}; not stored")
    state.system_prompt = wanted
    return {"system_prompt": state.system_prompt}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    """The shim's own figures (Triton's and the generator's are on Triton's metrics port)."""
    return shim_state(request).metrics.render()
