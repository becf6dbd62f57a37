"""The shim's Triton client: error mapping and the never-a-shorter-list rule."""
import asyncio

import pytest
from tritonclient.utils import InferenceServerException

from shim.ensemble import Answer, EnsembleClient, EnsembleError, map_triton_error


@pytest.mark.parametrize("status, message, expected", [
    ("400", "in ensemble 'llm', prompt 3: temperature must be in [0, 2], got 9", 400),
    ("503", "the generator is restarting", 503),
    ("UNAVAILABLE", "Unavailable: model not ready", 503),
    ("500", "Failed to process the request(s) for model 'generator', message: Stub process is not healthy", 502),
    (None, "internal error in the generator (see the server log)", 502),
])
def test_triton_errors_map_to_shim_statuses(status, message, expected):
    error = map_triton_error(InferenceServerException(message, status=status))
    assert error.status == expected
    assert "in ensemble 'llm', " not in error.message
    if expected == 400:
        assert error.message == "prompt 3: temperature must be in [0, 2], got 9"


def test_a_shorter_answer_list_is_a_502_never_passed_on(monkeypatch):
    """A fault injected into one chunk's reply: a row goes missing; the client refuses the list."""
    async def one_row_lost(self, inputs, extra_outputs, offset=0):
        rows = inputs[0].shape()[0]  # the prompt tensor, [rows, 1]
        return [Answer("a", 1, 1, "length") for _ in range(rows)][1:]

    monkeypatch.setattr(EnsembleClient, "_call", one_row_lost)
    client = EnsembleClient("127.0.0.1:1", max_batch_size=4)
    with pytest.raises(EnsembleError) as caught:
        asyncio.run(client.generate([f"q{i}" for i in range(10)]))
    assert caught.value.status == 502
    assert "returned 7 answers for 10 prompts" in caught.value.message
