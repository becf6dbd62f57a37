"""The FastAPI shim: the judge's contract (`GET /`, `POST /predict`) in front of the ensemble.

It answers `GET /` from its first second (warming until the ensemble is ready and warmed
up), sends the judge's list as a few batched tensors, and holds the run-time system
prompt, which it sends with every request so each request sees exactly one prompt.
Routes live in module-level routers (here, `openai_api`, `ui`) and reach the one
`ShimState` through `shim_state(request)`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Mapping

from fastapi import APIRouter, FastAPI, Request

from preprocess import settings as cfg
from preprocess.runtime import CancelMarkers
from preprocess.progress import Heartbeat
from preprocess.warmup import warmup_prompts

from .bodies import Limits, PredictRequest, SystemPromptRequest, json_body, parse_body
from .ensemble import Answer, EnsembleClient, EnsembleError
from .errors import ApiError, ClientGone, install_handlers
from .guards import Guards, ShimMetrics
from preprocess.runtime import GeneratorState

log = logging.getLogger("shim")

WARMUP_MAX_TOKENS = 8


class ShimState:
    """Settings (parsed once), health, warm-up and the run-time system prompt."""

    def __init__(self, environ: Mapping[str, str], client: EnsembleClient | None = None, restart_server=None):
        self.environ = environ  # kept for BATCH_MODE, which health reads live
        self.shim = cfg.load_shim(environ)
        runtime = cfg.runtime_dir(environ)
        self.routing = cfg.load_routing(environ)
        self.sampling = cfg.load_sampling(environ)
        self.warmup = cfg.load_warmup(environ)
        self.model_dir = cfg.resolve_model_dir(environ)
        self.system_prompt = cfg.load_chat(environ).system_prompt
        self.limits = Limits(self.shim.max_batch_prompts, self.shim.max_request_tokens,
                             max(self.routing.max_new_tokens, self.routing.max_new_tokens_code_soft,
                                 self.routing.max_new_tokens_code, self.routing.max_new_tokens_code_hard))
        self.restart_server = restart_server  # the supervisor's restart, under ./build.sh serve
        self.client = client or EnsembleClient(
            f"{self.shim.triton_host}:{self.shim.triton_http_port}", timeout_s=self.shim.request_timeout_s,
            cancel_markers=CancelMarkers(runtime / "cancelled" if runtime else None))
        self.on_restart = None  # a metric
        self.generator = GeneratorState(runtime)
        self.ready = False
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self.last_wait_report_s = 0.0

    async def generate(self, request: Request, prompts: list[str], overrides: dict[str, Any],
                       system_prompt: str | None = None) -> list[Answer]:
        """The ensemble's answers; a client that disconnects first has its generation aborted."""
        work = self.client.generate(prompts, self.system_prompt if system_prompt is None else system_prompt,
                                    overrides)
        return await run_until_disconnect(request, work)

    async def monitor(self) -> None:
        """Follows the ensemble: warm up whenever it (re)appears, fall back to warming when it
        goes, and restart tritonserver only when its models are dead (see EnsembleClient)."""
        while True:
            generator_up = self.generator.up()
            if not generator_up:
                # The generator is rebuilding its engine by itself: its failures are not a dead server.
                self.client.reset_failures()
            if self.restart_server is not None and self.client.persistently_failing():
                log.error("every request fails although Triton says ready (%d in a row): restarting tritonserver",
                          self.client.failures_in_a_row)
                self.ready = False
                self.client.reset_failures()
                if self.on_restart is not None:
                    self.on_restart()
                await asyncio.to_thread(self.restart_server)
            up = generator_up and await self.client.ready()
            if not up and not self.ready:
                self._report_waiting()
            if up and not self.ready:
                await self._warm_up()
            elif not up and self.ready:
                log.warning("the ensemble is not ready any more; health says warming")
                self.ready = False
            await asyncio.sleep(0.5)

    def _report_waiting(self) -> None:
        """While the model server comes up (engine load: tens of seconds), one line every 5 s."""
        waited = time.monotonic() - self.started
        if waited - self.last_wait_report_s >= 5.0:
            self.last_wait_report_s = waited
            log.info("waiting for the model server: %.0f s (generator: %s)", waited, self.generator.describe())

    async def _warm_up(self) -> None:
        await self.client.read_max_batch_size()
        prompts = warmup_prompts(self.warmup)
        started = time.monotonic()
        try:
            with Heartbeat(log, f"warm-up ({len(prompts)} prompts through the ensemble)"):
                await self.client.generate(prompts, self.system_prompt, {"max_new_tokens": WARMUP_MAX_TOKENS})
        except EnsembleError as exc:
            log.warning("warm-up failed (%s); will retry", exc.message)
            return
        self.ready = True
        if self.ready_after_s is None:
            self.ready_after_s = time.monotonic() - self.started
        log.info("ready: warm-up took %.1f s, %.1f s since the shim started", time.monotonic() - started,
                 time.monotonic() - self.started)


def shim_state(request: Request) -> ShimState:
    return request.app.state.shim


router = APIRouter()


@router.get("/")
async def health(request: Request):
    state = shim_state(request)
    if not state.ready:
        return {"status": "warming"}
    return {"status": "batch" if cfg.batch_mode(state.environ) else "ok"}


@router.post("/predict", openapi_extra=json_body(PredictRequest))
async def predict(request: Request):
    state = shim_state(request)
    body = await parse_body(request, PredictRequest)
    prompts = body.prompts()
    overrides = state.limits.admit(prompts, body.overrides(), indexed=isinstance(body.prompt, list))
    texts = [a.text for a in await state.generate(request, prompts, overrides)]
    return {"response": texts if isinstance(body.prompt, list) else texts[0]}


@router.get("/info")
async def info(request: Request):
    state = shim_state(request)
    generator = state.generator.read() or {}
    routing = state.routing
    return {
        "backend": generator.get("backend"),
        "engine_mode": generator.get("engine_mode"),
        "model_dir": generator.get("model_dir") or str(state.model_dir),
        "engine_args": generator.get("engine_kwargs", {}),
        "scheduler": generator.get("scheduler", {}),
        "engine_restarts": generator.get("restarts", 0),
        "ready": state.ready,
        "batch_mode": cfg.batch_mode(state.environ),
        "routing": {
            "disabled": routing.disabled,
            "max_new_tokens": routing.max_new_tokens,
            "max_new_tokens_code_soft": routing.max_new_tokens_code_soft,
            "max_new_tokens_code": routing.max_new_tokens_code,
            "max_new_tokens_code_hard": routing.max_new_tokens_code_hard,
        },
        "sampling_defaults": dataclasses.asdict(state.sampling),
        "limits": {
            "max_batch_prompts": state.limits.max_batch_prompts,
            "max_request_tokens": state.limits.max_request_tokens,
            "max_body_bytes": state.shim.max_body_bytes,
            "max_header_bytes": state.shim.max_header_bytes,
            "header_timeout_s": state.shim.header_timeout_s,
            "body_timeout_s": state.shim.body_timeout_s,
        },
        "system_prompt_chars": len(state.system_prompt),
        "env": cfg.public_environment(state.environ),
    }


@router.get("/system_prompt")
async def get_system_prompt(request: Request):
    return {"system_prompt": shim_state(request).system_prompt}


@router.post("/system_prompt", openapi_extra=json_body(SystemPromptRequest))
async def set_system_prompt(request: Request):
    state = shim_state(request)
    body = await parse_body(request, SystemPromptRequest)
    try:
        state.system_prompt = cfg.validate_system_prompt(body.system_prompt)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    return {"system_prompt": state.system_prompt}


def create_app(environ: Mapping[str, str] | None = None, client: EnsembleClient | None = None,
               on_shutdown=None, restart_server=None) -> FastAPI:
    from .openai_api import router as openai_router
    from .ui import router as ui_router

    environ = os.environ if environ is None else environ
    state = ShimState(environ, client, restart_server)
    client, shim = state.client, state.shim
    metrics = ShimMetrics()
    client.on_failure = metrics.model_failures.inc
    state.on_restart = metrics.server_restarts.inc

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        monitor = asyncio.create_task(state.monitor())
        yield
        monitor.cancel()
        await client.close()
        if on_shutdown is not None:
            on_shutdown()

    # No slash redirects: a 307 to a Location built from the request's Host header helps nobody.
    app = FastAPI(title="LLM service (Triton ensemble shim)", lifespan=lifespan, redirect_slashes=False)
    app.state.shim = state
    app.add_middleware(Guards, max_body_bytes=shim.max_body_bytes, body_timeout_s=shim.body_timeout_s,
                       admin_token=shim.admin_token, metrics=metrics, routes=app.router.routes)
    install_handlers(app)
    for part in (router, openai_router, ui_router):
        app.include_router(part)

    @app.get("/metrics")
    async def prometheus_metrics():
        return metrics.render()

    return app


async def run_until_disconnect(request: Request, work):
    """Run `work`; if the client disconnects first, cancel it (which aborts it in vLLM)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            log.info("client disconnected; cancelling its generation")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise ClientGone()
