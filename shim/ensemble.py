"""The shim's door to the `llm` ensemble: batched tensors in, answers out, errors mapped.

A judge list of N prompts goes out as ceil(N / max_batch_size) batched requests of even
sizes, sent together, not N requests; answers come back in order, or the whole call fails
(never a shorter list).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import tritonclient.http.aio as triton_http
from tritonclient.utils import InferenceServerException

from preprocess.contract import (ENSEMBLE, EXPLAIN_OUTPUTS, MAX_BATCH_SIZE, OPTIONAL_OUTPUTS, OUTPUTS, PAD_ID,
                                 PREPROCESS, SETTINGS, STREAM_ENSEMBLE)
from preprocess.runtime import CancelMarkers
from preprocess.triton_io import unpad_token_ids

from .errors import ApiError

log = logging.getLogger("shim.ensemble")


class EnsembleError(ApiError):
    """A failed call to Triton, with the HTTP status the shim should answer."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list | None = None  # [[token, logprob, [[token, logprob], ...]], ...] when asked for
    prompt_ids: list[int] | None = None  # when asked for
    reasoning: str | None = None  # when asked for: the thinking split out of the answer ("" if none)


def _text_input(name: str, texts: Sequence[str], client=triton_http):
    array = np.array([[t.encode("utf-8", "surrogatepass")] for t in texts], dtype=np.object_)
    tensor = client.InferInput(name, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return tensor


def fits(value: Any, numpy_type) -> bool:
    """Whether `value` survives the cast to the tensor's type unchanged in meaning."""
    if numpy_type is np.bool_:
        return True
    if np.issubdtype(numpy_type, np.integer):
        bounds = np.iinfo(numpy_type)
        return bounds.min <= int(value) <= bounds.max
    return abs(float(value)) <= np.finfo(numpy_type).max  # beyond it the cast gives inf


def build_inputs(prompts: Sequence[str], system_prompt: str | None, overrides: dict[str, Any],
                 row_input: str = "prompt", texts: Mapping[str, str] | None = None, client=triton_http) -> list:
    """`prompts` go in as `row_input` ("prompt", or "messages" for conversations as JSON);
    `texts` (stop, response_format) and the overrides apply to every row; an override given
    as a list holds one value per row. `client`: the tritonclient module whose InferInput to
    build (HTTP, or gRPC for streams)."""
    inputs = [_text_input(row_input, prompts, client)]
    if system_prompt is not None:
        inputs.append(_text_input("system_prompt", [system_prompt] * len(prompts), client))
    for name, text in (texts or {}).items():
        if text:
            inputs.append(_text_input(name, [text] * len(prompts), client))
    for name, value in overrides.items():
        if value is None:
            continue
        triton_type, numpy_type = SETTINGS[name].triton_type, SETTINGS[name].numpy_type
        values = value if isinstance(value, list) else [value]
        for one in values:
            if not fits(one, numpy_type):  # NumPy would wrap it silently (2**32 - 1 -> top_k -1)
                raise EnsembleError(400, f"{name}: {one!r} is out of range for {triton_type}")
        array = (np.array(value, dtype=numpy_type).reshape(-1, 1) if isinstance(value, list)
                 else np.full((len(prompts), 1), value, dtype=numpy_type))
        tensor = client.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def rows_of(overrides: dict[str, Any], start: int, count: int) -> dict[str, Any]:
    """The overrides of rows start..start+count: a per-row list is cut to them."""
    return {name: value[start:start + count] if isinstance(value, list) else value
            for name, value in overrides.items()}


def even_chunks(items: Sequence, limit: int) -> list[Sequence]:
    """As few chunks as `limit` allows, of sizes that differ by at most one (650 with a
    limit of 512: 325 and 325, not 512 and 138), so that the requests sent together take
    about as long as each other and the generator's replicas get even shares."""
    count = -(-len(items) // limit)
    size, extra = divmod(len(items), count)
    bounds = [0]
    for k in range(count):
        bounds.append(bounds[-1] + size + (1 if k < extra else 0))
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


READY_TIMEOUT_S = 5.0  # the readiness probe's wait; a Triton that answers at all answers in milliseconds

# Triton's status as tritonclient reports it (HTTP: the status code; gRPC: the call's code).
TRITON_STATUS = {"400": 400, "StatusCode.INVALID_ARGUMENT": 400,
                 "503": 503, "UNAVAILABLE": 503, "StatusCode.UNAVAILABLE": 503}


def ensemble_error(status: int | None, message: str) -> EnsembleError:
    """The shim's answer to a failed call: bad input stays a 400, unavailable a 503 (it heals
    by itself), anything else is a 502 (after which the shim probes the server: EnsembleClient)."""
    if status in (400, 503):
        return EnsembleError(status, message)
    return EnsembleError(502, f"model server error: {message}")


def map_triton_error(exc: InferenceServerException) -> EnsembleError:
    """A Triton error by its status alone, never by its text (a failed stream names its kind
    in a tensor instead: shim.streaming.read_piece)."""
    message = exc.message() or str(exc)
    for prefix in (f"in ensemble '{ENSEMBLE}', ", f"in ensemble '{STREAM_ENSEMBLE}', "):
        message = message.replace(prefix, "")
    return ensemble_error(TRITON_STATUS.get(str(exc.status())), message)


def read_answers(result, wanted: Sequence[str]) -> list[Answer]:
    """The ensemble's output tensors as answers; `wanted`: the optional outputs asked for."""
    texts = [t.decode("utf-8", "replace") for t in result.as_numpy("answer").reshape(-1)]
    prompt_tokens = result.as_numpy("prompt_tokens").reshape(-1).tolist()
    completion_tokens = result.as_numpy("completion_tokens").reshape(-1).tolist()
    reasons = [r.decode() for r in result.as_numpy("finish_reason").reshape(-1)]
    count = len(texts)
    logprobs = ([json.loads(t) if t else None for t in result.as_numpy("logprobs").reshape(-1)]
                if "logprobs" in wanted else [None] * count)
    prompt_ids = unpad_token_ids(result.as_numpy("prompt_ids")) if "prompt_ids" in wanted else [None] * count
    reasoning = ([t.decode("utf-8", "replace") for t in result.as_numpy("reasoning").reshape(-1)]
                 if "reasoning" in wanted else [None] * count)
    return [Answer(*row) for row in zip(texts, prompt_tokens, completion_tokens, reasons, logprobs, prompt_ids,
                                        reasoning)]


ROW_IN_MESSAGE = re.compile(r"^prompt (\d+)\b")  # every stage names a bad row "prompt N" first


def renumber_prompt(message: str, offset: int) -> str:
    """"prompt 188: ..." of a chunk starting at row 512 as "prompt 700: ..."."""
    return ROW_IN_MESSAGE.sub(lambda m: f"prompt {int(m.group(1)) + offset}", message, count=1) if offset else message


async def first_failure_ends_all(calls) -> list:
    """The results of `calls` run together, in order; the first failure cancels the rest
    (which aborts their generations: see EnsembleClient._infer) and is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()  # a no-op on those done; the rest were failed or abandoned by our caller
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


class EnsembleClient:
    def __init__(self, url: str, max_batch_size: int = MAX_BATCH_SIZE, timeout_s: float = 600.0,
                 cancel_markers: CancelMarkers | None = None):
        self.url = url
        self.cancel_markers = cancel_markers or CancelMarkers(None)
        # A stub that died leaves Triton "ready" while every request fails, which only a
        # restart repairs. A client's 5xx only makes the server `suspect`; what counts toward
        # a restart is the shim's own probes failing (ShimState), never a client's answers,
        # which any stranger can make fail.
        self.suspect = False
        self.failures_in_a_row = 0  # failed probes since the last success
        self.first_failure_at: float | None = None
        self.on_failure = None  # called for each model failure a client or a probe met (a metric)
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._client: triton_http.InferenceServerClient | None = None
        self._calls_in_flight = 0

    def _connection(self) -> triton_http.InferenceServerClient:
        if self._client is None:
            self._client = triton_http.InferenceServerClient(self.url, conn_limit=256, conn_timeout=self.timeout_s)
        return self._client

    async def read_max_batch_size(self) -> None:
        """Chunk lists by the ensemble's own max_batch_size, as Triton reports it."""
        try:
            config = await self._connection().get_model_config(ENSEMBLE)
            self.max_batch_size = int(config.get("max_batch_size") or self.max_batch_size)
        except Exception as exc:  # keep the current size; the next warm-up asks again
            log.warning("could not read the ensemble's max_batch_size: %s", exc)

    async def ready(self) -> bool:
        """Asked on a connection of its own, closed after: a stopping tritonserver stops
        accepting connections but goes on answering the ones open, so a pooled connection
        would say "ready" until it exits."""
        probe = triton_http.InferenceServerClient(self.url, conn_timeout=READY_TIMEOUT_S)
        try:
            return bool(await probe.is_model_ready(ENSEMBLE))
        except Exception:
            return False
        finally:
            await probe.close()

    async def let_go_when_idle(self) -> None:
        """Close our pooled connections if no call is using them. A stopping tritonserver
        waits out its exit timeout (30 s by default) while any HTTP connection is open, idle
        keep-alive ones included; with ours gone it exits at once. The next call reconnects."""
        if self._calls_in_flight == 0:
            await self.close()

    async def generate(self, prompts: Sequence[str], system_prompt: str | None = None,
                       overrides: dict[str, Any] | None = None, row_input: str = "prompt",
                       texts: Mapping[str, str] | None = None, outputs: Sequence[str] = ()) -> list[Answer]:
        """Answers in order; `outputs` names the optional outputs wanted (OPTIONAL_OUTPUTS)."""
        if not prompts:
            return []
        chunks = even_chunks(prompts, self.max_batch_size)
        offsets = itertools.accumulate((len(chunk) for chunk in chunks[:-1]), initial=0)
        results = await first_failure_ends_all(
            self._call(build_inputs(chunk, system_prompt, rows_of(overrides or {}, offset, len(chunk)), row_input,
                                    texts), outputs, offset)
            for chunk, offset in zip(chunks, offsets))
        answers = [answer for chunk in results for answer in chunk]
        if len(answers) != len(prompts):  # a server bug, never passed on as a shorter list
            raise EnsembleError(502, f"the model server returned {len(answers)} answers for {len(prompts)} prompts")
        return answers

    async def explain(self, prompt: str, system_prompt: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
        """What the preprocess model makes of one question: route, token limit, final prompt."""
        result = await self._infer(PREPROCESS, build_inputs([prompt], system_prompt, overrides), EXPLAIN_OUTPUTS)
        ids = result.as_numpy("PROMPT_IDS").reshape(-1)
        return {
            "route": result.as_numpy("ROUTE").reshape(-1)[0].decode(),
            "max_new_tokens": int(result.as_numpy("MAX_TOKENS").reshape(-1)[0]),
            "is_code": bool(result.as_numpy("IS_CODE").reshape(-1)[0]),
            "prompt": result.as_numpy("PROMPT_TEXT").reshape(-1)[0].decode("utf-8", "replace"),
            "prompt_tokens": int((ids != PAD_ID).sum()),
        }

    async def _call(self, inputs: list, extra_outputs: Sequence[str], offset: int = 0) -> list[Answer]:
        """One chunk's answers; an error about one of its rows names the row's index in the
        whole request (the chunk starts at `offset`)."""
        wanted = [name for name in OPTIONAL_OUTPUTS if name in extra_outputs]
        try:
            result = await self._infer(ENSEMBLE, inputs, (*OUTPUTS, *wanted))
        except EnsembleError as exc:
            raise EnsembleError(exc.status, renumber_prompt(exc.message, offset)) from None
        if "logprobs" in wanted:  # megabytes of JSON per row: decoded off the event loop
            return await asyncio.to_thread(read_answers, result, wanted)
        return read_answers(result, wanted)

    async def _infer(self, model: str, inputs: list, output_names: Sequence[str]):
        outputs = [triton_http.InferRequestedOutput(name) for name in output_names]
        request_id = uuid.uuid4().hex
        self._calls_in_flight += 1
        try:
            result = await self._connection().infer(
                model, inputs, outputs=outputs, request_id=request_id, timeout=int(self.timeout_s))
        except InferenceServerException as exc:
            error = map_triton_error(exc)
            if error.status == 502:  # a model failed; 503 (restarting, unavailable) heals by itself
                self.suspect = True
                if self.on_failure is not None:
                    self.on_failure()
            raise error from None
        except asyncio.CancelledError:
            # Our caller is gone; Triton's HTTP frontend will not tell the model, so we do.
            self.cancel_markers.mark(request_id)
            raise
        except Exception as exc:  # connection refused/reset: the server is down or restarting
            raise EnsembleError(503, f"the model server is unavailable ({type(exc).__name__}: {exc})") from None
        finally:
            self._calls_in_flight -= 1
        if model == ENSEMBLE:  # the whole chain answered: nothing of it is dead
            self.reset_failures()
        return result

    def reset_failures(self) -> None:
        self.suspect, self.failures_in_a_row, self.first_failure_at = False, 0, None

    def probe_failed(self) -> None:
        self.failures_in_a_row += 1
        if self.first_failure_at is None:
            self.first_failure_at = time.monotonic()

    def persistently_failing(self, count: int = 3, seconds: float = 5.0) -> bool:
        return (self.failures_in_a_row >= count and self.first_failure_at is not None
                and time.monotonic() - self.first_failure_at >= seconds)

    async def close(self) -> None:
        client, self._client = self._client, None  # a call made while this closes opens a new one
        if client is not None:
            await client.close()
