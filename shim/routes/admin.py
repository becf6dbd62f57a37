"""What operators read and change: `/info`, the run-time system prompt, `/metrics`."""
from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request

from preprocess import settings as cfg

from ..bodies import SystemPromptRequest, json_body, parse_body
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


@router.post("/system_prompt", openapi_extra=json_body(SystemPromptRequest))
async def set_system_prompt(request: Request):
    """Takes effect for the next request; each request carries exactly one prompt."""
    state = shim_state(request)
    body = await parse_body(request, SystemPromptRequest)
    try:
        state.system_prompt = cfg.validate_system_prompt(body.system_prompt)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    return {"system_prompt": state.system_prompt}


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    """The shim's own figures (Triton's and the generator's are on Triton's metrics port)."""
    return shim_state(request).metrics.render()
