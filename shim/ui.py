"""The web page (`GET /ui`) and the routing explainer it uses (`POST /explain`).

The page is one static HTML file with plain JavaScript that calls the shim's own routes
(/predict, /system_prompt, /info, /explain); there is no front-end build step.
`/explain` asks the `preprocess` model in Triton directly, so what it shows is exactly
what the ensemble would route and send to the engine.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, StrictStr

from .bodies import error, json_body, parse_body
from .ensemble import EnsembleError, not_text

PAGE = Path(__file__).resolve().parent / "static" / "ui.html"


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr
    max_new_tokens: int | None = None
    raw: bool | None = None


def build_ui_router(state) -> APIRouter:
    router = APIRouter()

    @router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @router.post("/explain", openapi_extra=json_body(ExplainRequest))
    async def explain(request: Request):
        body = await parse_body(request, ExplainRequest)
        if not_text([body.prompt]) is not None:
            return error(400, "prompt is not valid UTF-8 text (a lone surrogate)")
        overrides = body.model_dump(exclude={"prompt"}, exclude_none=True)
        try:
            return await state.client.explain(body.prompt, state.system_prompt, overrides)
        except EnsembleError as exc:
            return error(exc.status, exc.message)

    return router
