"""The evaluation client's contract: `GET /` health and `POST /predict`."""
from __future__ import annotations

from fastapi import APIRouter, Request

from ..bodies import PredictRequest, json_body, parse_body
from ..render import HEAVY_REPLY_CHARS, json_reply
from ..state import shim_state

router = APIRouter()


@router.get("/")
async def health(request: Request):
    """`warming` until the ensemble is up and warmed; then `ok`, or `batch` under BATCH_MODE.
    `degraded` while some of the generator's replicas are down and the others serve."""
    state = shim_state(request)
    if not state.ready:
        return {"status": "warming"}
    if state.degraded:
        up, total = state.replicas_up
        return {"status": "degraded", "replicas_up": up, "replicas": total}
    return {"status": "batch" if state.batch_mode else "ok"}


@router.post("/predict", openapi_extra=json_body(PredictRequest))
async def predict(request: Request):
    """A string gets a string; a list gets a list of the same length, in order."""
    state = shim_state(request)
    body = await parse_body(request, PredictRequest)
    prompts = body.prompts()
    overrides, work = await state.admit(prompts, body.overrides())
    texts = [a.text for a in await state.generate(request, prompts, overrides, work)]
    return await json_reply(lambda: {"response": texts if isinstance(body.prompt, list) else texts[0]},
                            heavy=sum(map(len, texts)) > HEAVY_REPLY_CHARS)
