"""The shim's one error type and its JSON answer, in two shapes by route:
- the judge's and the operators' routes: `{"error": "..."}`;
- OpenAI's routes (`/v1/...`): `{"error": {"message", "type", "param", "code"}}`, what OpenAI
  clients read, with 400 (not 422) for a value of the wrong type."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A request that ends in an error; `status` is what the client gets."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # Retry-After with a 429
        self.param = param  # the request field at fault, when one is (OpenAI's `param`)
        self.code = code  # OpenAI's machine-readable code, when one applies


class ClientGone(Exception):
    """The client closed the connection before its request was read or answered."""


OPENAI_ROUTES = "/v1/"
OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}


def openai_error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error(status: int, message: str, headers: dict[str, str] | None = None, path: str = "",
          param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error response for a request to `path`, in that route's shape."""
    if path.startswith(OPENAI_ROUTES):
        status = 400 if status == 422 else status
        return JSONResponse(status_code=status, content=openai_error_body(status, message, param, code),
                            headers=headers)
    return JSONResponse(status_code=status, content={"error": message}, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """ApiError and Starlette's own 404/405 answer in the same JSON shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.headers, request.url.path, exc.param, exc.code)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return error(499, "client disconnected; generation aborted", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), path=request.url.path)
