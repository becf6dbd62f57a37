"""The web page (`GET /ui`) and the routing explainer it uses (`POST /explain`).

The page is one static HTML file with plain JavaScript that calls the shim's own routes
(/predict, /system_prompt, /info, /explain); there is no front-end build step.
`/explain` asks the `preprocess` model in Triton directly, so what it shows is exactly
what the ensemble would route and send to the engine, and it refuses a prompt the engine
would refuse for its length, as /predict does.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from preprocess.engine.generation import PromptTooLong, check_prompt_length

from ..state import shim_state
from ..bodies import ExplainRequest, json_body, parse_body
from ..errors import ApiError

PAGE = Path(__file__).resolve().parent.parent / "static" / "ui.html"

router = APIRouter()


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.post("/explain", openapi_extra=json_body(ExplainRequest))
async def explain(request: Request):
    state = shim_state(request)
    body = await parse_body(request, ExplainRequest)
    overrides, _ = await state.admit([body.prompt], body.overrides())
    explained = await state.client.explain(body.prompt, state.system_prompt, overrides)
    try:
        check_prompt_length(0, explained["prompt_tokens"], (state.generator.read() or {}).get("max_model_len"))
    except PromptTooLong as exc:
        raise ApiError(400, str(exc)) from None
    return explained
