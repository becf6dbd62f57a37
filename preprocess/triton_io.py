"""NumPy-level helpers for the Triton adapters (no Triton import, so they are unit-tested).

Batched tensors have shape [batch, 1] for scalars and strings, [batch, width] for token ids.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .contract import GENERATOR_SCALARS, GENERATOR_TEXTS, PAD_ID, InvalidRequest
from .errors import ErrorKind


# The two helpers below take the stub's `triton_python_backend_utils` as an argument: the
# package never imports it (it exists only inside a stub), and every adapter shares them.
def input_reader(pb_utils, request) -> Callable[[str], np.ndarray | None]:
    """`read(name)`: the request's input tensor as NumPy, or None where the request has none."""
    def read(name: str) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()
    return read


def error_response(pb_utils, kind: ErrorKind, message: str):
    """Triton's error response of `kind` (preprocess.errors): the kind's code, the message as given."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError,
                                                                                  kind.triton_code)))


def decode_strings(array: np.ndarray, what: str) -> list[str]:
    """UTF-8 text of a [batch, 1] BYTES tensor; bad bytes are an error naming the row."""
    texts = []
    for row, value in enumerate(array.reshape(-1)):
        if isinstance(value, str):
            texts.append(value)
            continue
        try:
            texts.append(bytes(value).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{what}[{row}] is not valid UTF-8 ({exc.reason})") from None
    return texts


def encode_strings(texts: Sequence[str]) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)


def column(values: np.ndarray | Sequence | None, batch: int) -> list | None:
    """A [batch, 1] tensor (or list) as a list; a single value applies to every row."""
    if values is None:
        return None
    values = values.reshape(-1).tolist() if isinstance(values, np.ndarray) else list(values)
    if len(values) == 1 and batch > 1:
        values = values * batch
    if len(values) != batch:
        raise InvalidRequest(f"expected {batch} values, got {len(values)}")
    return values


def scalars(values: Sequence, dtype) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def pad_token_ids(rows: Sequence[Sequence[int]]) -> np.ndarray:
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), max(width, 1)), PAD_ID, dtype=np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def unpad_token_ids(array: np.ndarray) -> list[list[int]]:
    # Vectorised: a per-element loop here was a visible share of the generator's time (py-spy).
    return [row[row != PAD_ID].tolist() for row in np.atleast_2d(array)]


def request_fault(stage: str, exc: BaseException) -> str:
    """The 400 message for an exception a request's content caused in a stateless stage:
    what it was, in text that is always valid UTF-8 (the content may not be)."""
    text = f"{stage} could not handle this request: {type(exc).__name__}: {exc}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:1000]


def answer_each(requests: Sequence, answer, invalid, internal) -> list:
    """One response per request of a dynamic batch: a request that fails gets its own error
    response (`invalid(exc)` for bad input, `internal(exc)` for anything else) and the
    other requests of the batch are answered as usual."""
    responses = []
    for request in requests:
        try:
            responses.append(answer(request))
        except InvalidRequest as exc:
            responses.append(invalid(exc))
        except Exception as exc:
            responses.append(internal(request, exc))
    return responses


def answer_each_statelessly(pb_utils, requests: Sequence, answer, stage: str, log) -> list:
    """`answer_each` for a stage that keeps no state between requests (preprocess,
    postprocess): whatever fails there failed on this request's content, so every failure
    is INVALID (a 400, never a failure that looks like a dead server); an unexpected one is
    logged with its traceback and named to the client (`request_fault`)."""
    def invalid(exc: Exception):
        return error_response(pb_utils, ErrorKind.INVALID, str(exc))

    def fault(request, exc: Exception):
        log.exception("%s could not answer request %s", stage, request.request_id())
        return error_response(pb_utils, ErrorKind.INVALID, request_fault(stage, exc))

    return answer_each(requests, answer, invalid, fault)


def generator_columns(tensor: Callable[[str], np.ndarray | None]) -> tuple[list[list[int]], dict[str, list[Any]]]:
    """The generator's inputs (`tensor(name)` gives one, or None when absent): the prompts'
    token ids, and one list of values per SamplingSettings field. The request controls are
    optional: absent means off."""
    prompts = unpad_token_ids(tensor("PROMPT_IDS"))
    values: dict[str, list[Any]] = {}
    for name, _, field in GENERATOR_SCALARS:
        array = tensor(name)
        if array is not None:
            values[field] = array.reshape(-1).tolist()
    for name, field in GENERATOR_TEXTS:
        array = tensor(name)
        if array is not None:
            values[field] = decode_strings(array, name)
    return prompts, values


def stream_outputs(piece: dict, logprobs: str, error: ErrorKind | None = None) -> dict[str, np.ndarray]:
    """generator_stream's output tensors for one piece (the generator's, one row), its
    TOKEN_IDS (one row, as many as the piece has, maybe none) and ERROR: "" or, on a failed
    stream's last response, its kind (contract.STREAM_OUTPUTS)."""
    return {**generator_outputs([piece["text"]], [piece["prompt_tokens"]], [piece["tokens"]],
                                [piece.get("finish_reason") or ""], [logprobs]),
            "TOKEN_IDS": np.array([piece.get("token_ids") or []], dtype=np.int32).reshape(1, -1),
            "ERROR": encode_strings([error.value if error is not None else ""])}


def generator_outputs(texts: Sequence[str], prompt_tokens: Sequence[int], completion_tokens: Sequence[int],
                      finish_reasons: Sequence[str], logprobs: Sequence[str]) -> dict[str, np.ndarray]:
    """The output tensors of the generator and of generator_stream, one row per answer (or
    piece): the same names and dtypes in both config.pbtxt files."""
    return {
        "TEXT": encode_strings(texts),
        "PROMPT_TOKENS": scalars(prompt_tokens, np.int32),
        "COMPLETION_TOKENS": scalars(completion_tokens, np.int32),
        "FINISH_REASON": encode_strings(finish_reasons),
        "LOGPROBS": encode_strings(logprobs),
    }
