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


class KeepAliveServer:
    """A stand-in for Triton's HTTP front end that only counts the connections open to it:
    every request gets a small JSON 200 and the connection is kept for the next one."""

    def __init__(self):
        self.open = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while (await reader.readuntil(b"\r\n\r\n")):
                body = b'{"max_batch_size": 8}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def settled(self, expected: int) -> int:
        for _ in range(200):  # the server's side of a close arrives a loop turn or two later
            if self.open == expected:
                break
            await asyncio.sleep(0.01)
        return self.open


def test_the_readiness_probe_leaves_no_connection_and_idle_ones_are_let_go():
    """A stopping tritonserver answers on the connections already open and waits for them
    to close (its exit timeout): the probe must not hold one, and the pool lets go of its
    idle ones when the ensemble is not ready, never of one a call is using."""
    async def scenario():
        counter = KeepAliveServer()
        server = await asyncio.start_server(counter.serve, "127.0.0.1", 0)
        client = EnsembleClient(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            assert await client.ready() is True
            assert await counter.settled(0) == 0  # the probe's own connection is closed
            await client.read_max_batch_size()  # a pooled keep-alive connection
            assert client.max_batch_size == 8 and await counter.settled(1) == 1
            client._calls_in_flight = 1  # as while a request is being answered
            await client.let_go_when_idle()
            assert await counter.settled(1) == 1
            client._calls_in_flight = 0
            await client.let_go_when_idle()
            assert await counter.settled(0) == 0
            await client.read_max_batch_size()  # the next call reconnects
            assert await counter.settled(1) == 1
        finally:
            await client.close()
            server.close()

    asyncio.run(scenario())
