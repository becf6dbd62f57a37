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
from preprocess.engine.generation import EngineUnavailable, classify_error, client_error
from preprocess.errors import ErrorKind
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


class ScriptedTriton:
    """Fault injection: each infer takes the next outcome, an InferenceServerException to
    raise (with Triton's real message for a dead stub) or None for one good answer."""

    DEAD_STUB = ("Failed to process the request(s) for model 'postprocess_0_0', message: Stub process "
                 "'postprocess_0_0' is not healthy.")

    def __init__(self, outcomes):
        self.outcomes = list(outcomes)

    async def infer(self, *args, **kwargs):
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise InferenceServerException(outcome, status="500")
        import numpy as np

        answers = {"answer": [b"ok"], "prompt_tokens": [3], "completion_tokens": [1], "finish_reason": [b"length"]}

        class Result:
            def as_numpy(self, name):
                return np.array(answers[name], dtype=np.object_ if name in ("answer", "finish_reason") else np.int32)
        return Result()


def shim_with(outcomes, restarts):
    from preprocess import settings as cfg
    from shim.state import ShimState

    client = EnsembleClient("127.0.0.1:1")
    client._client = ScriptedTriton(outcomes)
    return ShimState(cfg.load({}), {}, client, restart_server=lambda: restarts.append(1))


def test_client_failures_never_restart_when_the_probe_answers():
    """Twenty requests that fail as a dead model would, each followed by the shim's probe,
    which answers: the server is never restarted, however long it goes on."""
    restarts = []
    state = shim_with([ScriptedTriton.DEAD_STUB, None] * 20, restarts)

    async def run():
        for _ in range(20):
            with pytest.raises(Exception):
                await state.client.generate(["a client's request"])
            assert state.client.suspect
            state.client.first_failure_at = time.monotonic() - 60  # as if failing for a minute
            assert not await state.check_for_dead_server()
            assert not state.client.suspect
    asyncio.run(run())
    assert restarts == []


def test_probes_that_keep_failing_restart_the_server():
    """The positive control: a dead stub fails the probes too, and three failed probes over
    five seconds restart tritonserver, once."""
    restarts = []
    state = shim_with([ScriptedTriton.DEAD_STUB] * 4, restarts)

    async def run():
        with pytest.raises(Exception):
            await state.client.generate(["a client's request"])
        assert not await state.check_for_dead_server()
        assert not await state.check_for_dead_server()
        state.client.first_failure_at -= 5  # the three failed probes span five seconds
        assert await state.check_for_dead_server()
    asyncio.run(run())
    assert restarts == [1] and state.metrics.server_restarts._value.get() == 1


def test_what_a_client_is_told_whole_or_streamed():
    """generation.client_error, for the generator's responses and its stream socket alike: bad
    input keeps its words; an internal error's text (paths, class names) never leaves the server."""
    kind, text = client_error(RuntimeError("KeyError at /opt/secret/path.py:12"))
    assert kind is ErrorKind.INTERNAL and "secret" not in text and "RuntimeError" not in text
    assert client_error(InvalidRequest("temperature must be in [0, 2], got 9")) == \
        (ErrorKind.INVALID, "temperature must be in [0, 2], got 9")
    kind, text = client_error(EngineUnavailable("the engine died"))
    assert kind is ErrorKind.UNAVAILABLE and "retry shortly" in text and "the engine died" in text
    assert client_error(RuntimeError("x"), engine_healthy=False)[0] is ErrorKind.UNAVAILABLE


def test_a_restart_needs_three_failed_probes_over_five_seconds():
    client = EnsembleClient("127.0.0.1:1")
    for _ in range(3):
        client.probe_failed()
    assert not client.persistently_failing()  # three at once: not yet 5 s
    client.first_failure_at -= 5.0
    assert client.persistently_failing()
    client.failures_in_a_row = 2  # 5 s, but two probes
    assert not client.persistently_failing()
