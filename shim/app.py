"""The FastAPI shim: the judge's contract (`GET /`, `POST /predict`) in front of the ensemble.

It answers `GET /` from its first second (warming until the ensemble is ready and warmed
up), sends the judge's list as a few batched tensors, and holds the run-time system
prompt, which it sends with every request so each request sees exactly one prompt.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from typing import Any, Mapping

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from preprocess import settings as cfg
from preprocess.envparse import clip
from preprocess.progress import Heartbeat
from preprocess.generation import CancelMarkers
from preprocess.warmup import warmup_prompts

from .bodies import BadRequest, error, json_body, parse_body
from .ensemble import EnsembleClient, EnsembleError, not_text
from .guards import Guards, ShimMetrics
from .openai_api import build_router
from .ui import build_ui_router

log = logging.getLogger("shim")

WARMUP_MAX_TOKENS = 8


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: StrictStr | list[StrictStr]
    max_new_tokens: int | None = None
    temperature: float | None = Field(default=None, allow_inf_nan=False)
    top_p: float | None = Field(default=None, allow_inf_nan=False)
    top_k: int | None = None
    repetition_penalty: float | None = Field(default=None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    ignore_eos: bool | None = None  # benchmarks: fixed-length generation

    def overrides(self) -> dict[str, Any]:
        values = self.model_dump(exclude={"prompt"}, exclude_none=True)
        if "max_new_tokens" in values:  # clipped, as the reference service does
            values["max_new_tokens"] = clip(values["max_new_tokens"], 1, cfg.MAX_NEW_TOKENS_LIMIT)
        return values


class SystemPromptRequest(BaseModel):
    system_prompt: StrictStr


class ShimState:
    """Health, warm-up and the run-time system prompt."""

    def __init__(self, environ: Mapping[str, str], client: EnsembleClient, restart_server=None):
        self.environ = environ
        self.restart_server = restart_server  # the supervisor's restart, under ./build.sh serve
        self.client = client
        self.system_prompt = cfg.load_chat(environ).system_prompt
        self.warmup = cfg.load_warmup(environ)
        runtime = cfg.runtime_dir(environ)
        self.generator_state_path = runtime / "generator.json" if runtime else None
        self.ready = False
        self.started = time.monotonic()
        self.ready_after_s: float | None = None
        self.last_wait_report_s = 0.0

    def generator_state(self) -> dict[str, Any] | None:
        if self.generator_state_path is None:
            return None
        try:
            return json.loads(self.generator_state_path.read_text())
        except (OSError, ValueError):
            return None

    def generator_up(self) -> bool:
        state = self.generator_state()
        return state is None or bool(state.get("ready", True))

    async def monitor(self) -> None:
        """Follows the ensemble: warm up whenever it (re)appears, fall back to warming when it goes."""
        while True:
            if self.restart_server is not None and self.client.persistently_failing():
                log.error("every request fails although Triton says ready (%d in a row): restarting tritonserver",
                          self.client.failures_in_a_row)
                self.ready = False
                self.client.reset_failures()
                await asyncio.to_thread(self.restart_server)
            up = await self.client.ready() and self.generator_up()
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
            state = self.generator_state() or {}
            log.info("waiting for the model server: %.0f s (generator: %s)", waited,
                     "loading" if not state else ("ready" if state.get("ready") else "loading engine"))

    async def _warm_up(self) -> None:
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


def create_app(environ: Mapping[str, str] | None = None, client: EnsembleClient | None = None,
               on_shutdown=None, restart_server=None) -> FastAPI:
    environ = os.environ if environ is None else environ
    shim = cfg.load_shim(environ)
    runtime = cfg.runtime_dir(environ)
    client = client or EnsembleClient(f"{shim.triton_host}:{shim.triton_http_port}", timeout_s=shim.request_timeout_s,
                                      cancel_markers=CancelMarkers(runtime / "cancelled" if runtime else None))
    state = ShimState(environ, client, restart_server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        monitor = asyncio.create_task(state.monitor())
        yield
        monitor.cancel()
        await client.close()
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="LLM service (Triton ensemble shim)", lifespan=lifespan)
    app.state.shim = state
    metrics = ShimMetrics()
    app.add_middleware(Guards, max_body_bytes=shim.max_body_bytes, admin_token=shim.admin_token, metrics=metrics)

    app.include_router(build_router(state, cfg.resolve_model_dir(environ).name))
    app.include_router(build_ui_router(state))

    @app.get("/metrics")
    async def prometheus_metrics():
        return metrics.render()

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return error(exc.status, exc.message)

    @app.get("/")
    async def health():
        if not state.ready:
            return {"status": "warming"}
        return {"status": "batch" if cfg.batch_mode(environ) else "ok"}

    @app.post("/predict", openapi_extra=json_body(PredictRequest))
    async def predict(request: Request):
        body = await parse_body(request, PredictRequest)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        broken = not_text(prompts)
        if broken is not None:
            where = f"prompt[{broken}]" if isinstance(body.prompt, list) else "prompt"
            return error(400, f"{where} is not valid UTF-8 text (a lone surrogate)")
        if len(prompts) > shim.max_batch_prompts:
            return error(413, f"prompt list has {len(prompts)} items; the limit is {shim.max_batch_prompts}")
        try:
            answers = await run_until_disconnect(
                request, client.generate(prompts, state.system_prompt, body.overrides()))
        except EnsembleError as exc:
            return error(exc.status, exc.message)
        except ClientGone:
            return error(499, "client disconnected; generation aborted")
        texts = [a.text for a in answers]
        return {"response": texts if isinstance(body.prompt, list) else texts[0]}

    @app.get("/info")
    async def info():
        generator = state.generator_state() or {}
        routing = cfg.load_routing(environ)
        return {
            "backend": generator.get("backend"),
            "engine_mode": generator.get("engine_mode"),
            "model_dir": generator.get("model_dir") or str(cfg.resolve_model_dir(environ)),
            "engine_args": generator.get("engine_kwargs", {}),
            "engine_restarts": generator.get("restarts", 0),
            "ready": state.ready,
            "batch_mode": cfg.batch_mode(environ),
            "routing": {
                "disabled": routing.disabled,
                "max_new_tokens": routing.max_new_tokens,
                "max_new_tokens_code_soft": routing.max_new_tokens_code_soft,
                "max_new_tokens_code": routing.max_new_tokens_code,
                "max_new_tokens_code_hard": routing.max_new_tokens_code_hard,
            },
            "sampling_defaults": dataclasses.asdict(cfg.load_sampling(environ)),
            "system_prompt_chars": len(state.system_prompt),
            "env": cfg.public_environment(environ),
        }

    @app.get("/system_prompt")
    async def get_system_prompt():
        return {"system_prompt": state.system_prompt}

    @app.post("/system_prompt", openapi_extra=json_body(SystemPromptRequest))
    async def set_system_prompt(request: Request):
        body = await parse_body(request, SystemPromptRequest)
        try:
            state.system_prompt = cfg.validate_system_prompt(body.system_prompt)
        except ValueError as exc:
            return error(422, str(exc))
        return {"system_prompt": state.system_prompt}

    return app


class ClientGone(Exception):
    pass


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

