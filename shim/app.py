"""The FastAPI shim in front of the ensemble: `create_app` puts the state, the guards, the
error handlers and the routers (`shim.routes`) together.

The shim answers `GET /` from its first second (warming until the ensemble is ready and
warmed up), sends the judge's list as a few batched tensors, and holds the run-time system
prompt, which it sends with every request so each request sees exactly one prompt.
"""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Mapping

from fastapi import FastAPI

from preprocess import settings as cfg

from .ensemble import EnsembleClient
from .errors import install_handlers
from .guards import Guards
from .routes import admin, judge, openai, ui
from .state import ShimState


def create_app(settings: cfg.Settings | None = None, client: EnsembleClient | None = None,
               on_shutdown=None, restart_server=None, live_environ: Mapping[str, str] | None = None) -> FastAPI:
    """`settings` defaults to the process environment's; `live_environ` (os.environ) is
    where health reads BATCH_MODE at each request."""
    live_environ = os.environ if live_environ is None else live_environ
    state = ShimState(cfg.load(live_environ) if settings is None else settings, live_environ,
                      client, restart_server)
    shim = state.settings.shim

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        monitor = asyncio.create_task(state.monitor())
        yield
        monitor.cancel()
        await state.client.close()
        await state.streams.close()
        if on_shutdown is not None:
            on_shutdown()

    # No slash redirects: a 307 to a Location built from the request's Host header helps nobody.
    app = FastAPI(title="LLM service (Triton ensemble shim)", lifespan=lifespan, redirect_slashes=False)
    app.state.shim = state
    app.add_middleware(Guards, max_body_bytes=shim.max_body_bytes, body_timeout_s=shim.body_timeout_s,
                       admin_token=shim.admin_token, metrics=state.metrics, routes=app.router.routes,
                       drain=state.drain, api_key=shim.api_key)
    install_handlers(app)
    for part in (judge, admin, openai, ui):
        app.include_router(part.router)
    return app
