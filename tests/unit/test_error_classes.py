"""Which failures are the client's, which are a restarting engine, which are bugs; and which
ones the shim counts toward restarting a dead tritonserver."""
from __future__ import annotations

import asyncio
import os
import time

import pytest
from tritonclient.utils import InferenceServerException
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from preprocess.contract import InvalidRequest
from preprocess.engine.generation import PromptTooLong
from preprocess.engine.generation import EngineUnavailable, classify_error
from preprocess.runtime import CancelMarkers
from shim.ensemble import EnsembleClient, map_triton_error


@pytest.mark.parametrize("exc, kind", [
    (InvalidRequest("temperature must be in [0, 2], got 2.5"), "invalid"),
    (PromptTooLong("prompt 0 has 2000 tokens; the model length is 1024"), "invalid"),
    (VLLMValidationError("temperature must be in [0, 2], got 2.5.", parameter="temperature", value=2.5), "invalid"),
    (EngineDeadError(), "unavailable"),
    (EngineUnavailable("the generator engine is restarting; retry shortly"), "unavailable"),
    (asyncio.CancelledError("request cancelled"), "unavailable"),
    (ValueError("invalid literal for int() with base 10: 'x'"), "internal"),  # our bug, not bad input
    (KeyError("missing"), "internal"),
])
def test_error_classes(exc, kind):
    assert classify_error(exc) == kind


def test_any_error_while_the_engine_is_down_is_unavailable():
    assert classify_error(RuntimeError("socket closed"), engine_healthy=False) == "unavailable"


class FailingTriton:
    """Fault injection: Triton answers every infer with the given status and message."""

    def __init__(self, status, message):
        self.status, self.message = status, message

    async def infer(self, *args, **kwargs):
        raise InferenceServerException(self.message, status=self.status)


@pytest.mark.parametrize("status, message, shim_status, counted", [
    ("400", "in ensemble 'llm', prompt 0: temperature must be in [0, 2], got 2.5", 400, False),
    ("503", "the generator engine is unavailable or restarting; retry shortly", 503, False),
    ("500", "in ensemble 'llm', internal error in the generator (see the server log)", 502, True),
    ("500", "Failed to process the request(s) for model 'postprocess_0_0', message: Stub process "
            "'postprocess_0_0' is not healthy.", 502, True),
])
def test_only_model_failures_make_the_server_suspect(status, message, shim_status, counted):
    """A client's model failure only makes the shim probe; it never counts toward a restart."""
    client = EnsembleClient("127.0.0.1:1")
    client._client = FailingTriton(status, message)
    for _ in range(3):
        with pytest.raises(Exception) as caught:
            asyncio.run(client.generate(["q"]))
        assert caught.value.status == shim_status
    assert client.suspect == counted
    assert client.failures_in_a_row == 0 and not client.persistently_failing(count=1, seconds=0)


def test_map_triton_error_strips_the_ensemble_prefix():
    error = map_triton_error(InferenceServerException("in ensemble 'llm', prompt 0: bad", status="400"))
    assert (error.status, error.message) == (400, "prompt 0: bad")


def test_cancel_markers_guard_the_folder_and_stale_ones_are_swept(tmp_path):
    markers = CancelMarkers(tmp_path / "cancelled")
    for bad in ("../escape", "a/b", "", "x" * 129, "with space"):
        markers.mark(bad)
        assert not markers.take(bad)
    assert list((tmp_path / "cancelled").iterdir()) == []
    markers.mark("abc-123")
    assert markers.take("abc-123") and not markers.take("abc-123")
    markers.mark("answered-before-the-mark")
    markers.mark("fresh")
    old = time.time() - CancelMarkers.max_age_s - 5
    os.utime(tmp_path / "cancelled" / "answered-before-the-mark", (old, old))
    assert markers.sweep() == 1
    assert [p.name for p in (tmp_path / "cancelled").iterdir()] == ["fresh"]
