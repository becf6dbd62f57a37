"""The shim's door to `llm_stream`: one prompt in, the answer's pieces out as they are made.

`llm_stream` is decoupled, so it is reached over Triton's gRPC streaming. The request side
of the gRPC stream stays open until the last piece has come (a client that half-closes
early may lose the stream's tail). Leaving early (the HTTP client went away) cancels the
call and drops a cancel marker, as /predict does. The marker is what aborts the generation
in vLLM: Triton 2.51's ensemble does not pass a cancellation on to a step already running.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Mapping

import grpc
import tritonclient.grpc.aio as triton_grpc
from tritonclient.utils import InferenceServerException

from preprocess.contract import STREAM_ENSEMBLE, STREAM_OUTPUTS
from preprocess.errors import ErrorKind
from preprocess.runtime import CancelMarkers

from .ensemble import EnsembleError, build_inputs, ensemble_error, map_triton_error

log = logging.getLogger("shim.streaming")


@dataclass(frozen=True)
class Piece:
    """Text and tokens generated since the previous piece; the last has finish_reason."""
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    logprobs: list | None = None
    token_ids: tuple[int, ...] = ()


def read_piece(result) -> Piece:
    """One response of llm_stream; EnsembleError for the in-band end of a failed stream."""
    def first(name):
        return result.as_numpy(name).reshape(-1)[0]

    text = first("text").decode("utf-8", "replace")
    if kind := first("error").decode():
        raise ensemble_error(ErrorKind(kind).status, text)
    logprobs = first("logprobs").decode("utf-8")
    return Piece(text, int(first("prompt_tokens")),
                 int(first("completion_tokens")), first("finish_reason").decode() or None,
                 json.loads(logprobs) if logprobs else None, tuple(result.as_numpy("token_ids").reshape(-1).tolist()))


class StreamClient:
    def __init__(self, url: str, timeout_s: float = 600.0, cancel_markers: CancelMarkers | None = None):
        self.url = url
        self.timeout_s = timeout_s
        self.cancel_markers = cancel_markers or CancelMarkers(None)
        self._client: triton_grpc.InferenceServerClient | None = None

    def _connection(self) -> triton_grpc.InferenceServerClient:
        if self._client is None:
            self._client = triton_grpc.InferenceServerClient(self.url)
        return self._client

    async def stream(self, prompt: str, system_prompt: str | None, overrides: dict[str, Any],
                     row_input: str = "prompt", texts: Mapping[str, str] | None = None) -> AsyncIterator[Piece]:
        """The pieces of one answer, in order; the last has its finish reason. EnsembleError
        (with the status to answer) when Triton or a model refuses or fails."""
        inputs = build_inputs([prompt], system_prompt, overrides, row_input, texts, client=triton_grpc)
        outputs = [triton_grpc.InferRequestedOutput(name) for name in STREAM_OUTPUTS]
        request_id = uuid.uuid4().hex
        answered = asyncio.Event()

        async def requests():
            yield {"model_name": STREAM_ENSEMBLE, "inputs": inputs, "outputs": outputs, "request_id": request_id}
            await answered.wait()

        call = None
        try:
            call = self._connection().stream_infer(requests(), stream_timeout=self.timeout_s)
            async for result, error in call:
                if error is not None:
                    raise map_triton_error(error)
                piece = read_piece(result)
                if piece.finish_reason is not None:
                    # Answered before the last piece is handed out: a caller that closes this
                    # iterator after it has not left early, and nothing is cancelled.
                    answered.set()
                    yield piece
                    return
                yield piece
            raise EnsembleError(502, "the model server ended the stream before the answer was complete")
        except (asyncio.CancelledError, GeneratorExit):
            if not answered.is_set():
                self.cancel_markers.mark(request_id)  # the caller left: abort the generation
            raise
        except InferenceServerException as exc:
            raise map_triton_error(exc) from None
        except grpc.aio.AioRpcError as exc:
            raise EnsembleError(503, f"the model server is unavailable ({exc.code().name}: {exc.details()})") from None
        finally:
            if call is not None and not answered.is_set():
                call.cancel()
            answered.set()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
