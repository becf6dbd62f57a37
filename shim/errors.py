"""The shim's one error type and its JSON answer: `{"error": "..."}` with a 4xx/5xx status."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A request that ends in an error; `status` is what the client gets."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # Retry-After with a 429


class ClientGone(Exception):
    """The client closed the connection before its request was read or answered."""


def error(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, **extra}, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """ApiError and Starlette's own 404/405 answer in the same JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return error(499, "client disconnected; generation aborted")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))
