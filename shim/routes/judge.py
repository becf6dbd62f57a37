"""The evaluation client's contract: `GET /` health and `POST /predict`."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..bodies import PredictRequest, json_body, parse_body
from ..render import HEAVY_REPLY_CHARS, json_reply
from ..state import shim_state

router = APIRouter()


def health_state(state) -> dict:
    """`draining` once shutdown has begun; `warming` until the ensemble is up and warmed;
    `degraded` while some of the generator's replicas are down and the others serve; then
    `ok`, or `batch` under BATCH_MODE. When transformers serves because vLLM could not,
    `engine_fallback` says why (a field the judge ignores; `status` keeps its values)."""
    body = _health_status(state)
    if state.engine_fallback:
        body["engine"] = "transformers"
        body["engine_fallback"] = state.engine_fallback
    return body


def _health_status(state) -> dict:
    if state.drain.draining:
        return {"status": "draining"}
    if not state.ready:
        return {"status": "warming"}
    if state.degraded:
        up, total = state.replicas_up
        return {"status": "degraded", "replicas_up": up, "replicas": total}
    return {"status": "batch" if state.batch_mode else "ok"}


SERVING = ("ok", "batch")


@router.get("/")
async def health(request: Request):
    """The judge's contract: always 200, the state in the body (see health_state)."""
    return health_state(shim_state(request))


@router.get("/health/ready")
async def ready(request: Request):
    """For probes and load balancers: 200 while whole and serving, else 503, same body as `/`."""
    body = health_state(shim_state(request))
    return JSONResponse(body, status_code=200 if body["status"] in SERVING else 503)


@router.get("/health/live")
async def live(request: Request):
    """200 while the shim answers at all: it restarts a dead tritonserver itself."""
    return {"status": "alive"}


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
