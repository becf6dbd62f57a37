"""The generator's streaming socket, without Triton: where it listens, what it refuses, and
how a client sees a server that is not there (the served path is in test_openai_stream)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocess.engine.generation import client_error
from preprocess.engine.stream_socket import (UNIX_PATH_MAX, HandOff, StreamFailed, StreamServer, socket_path,
                                             stream_events)


# Every setting the generator needs, as preprocess sends them.
VALUES = {"max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
          "frequency_penalty": 0.0}
TOO_HOT = {**VALUES, "temperature": 9.0}


def test_the_socket_is_in_the_runtime_folder_or_per_triton_in_tmp(tmp_path):
    assert socket_path(tmp_path) == tmp_path / "stream.sock"
    deep = tmp_path / ("d" * UNIX_PATH_MAX)
    for fallback in (socket_path(deep), socket_path(None)):
        assert fallback.name == f"stream-{os.getppid()}.sock" and len(str(fallback)) < UNIX_PATH_MAX
        assert fallback.parent.name == f"llm-{os.getuid()}"


@pytest.fixture
def served(tmp_path):
    """A server whose service must never be reached: every request below is refused first."""
    server = StreamServer(service=None, path=tmp_path / "s" / "stream.sock", describe=client_error)
    server.start()
    yield server
    server.stop()
    assert not server.path.exists()


def raw_exchange(path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(line)
        return json.loads(conn.makefile("rb").readline())


def test_only_this_user_may_connect(served):
    assert (served.path.stat().st_mode & 0o777) == 0o600
    assert (served.path.parent.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("line, named", [
    (b"not json\n", "bad stream request"),
    (b'{"prompt_ids": [1, 2]}\n', "bad stream request"),
    (json.dumps({"prompt_ids": [1], "values": TOO_HOT}).encode() + b"\n", "temperature must be in [0, 2]"),
    (json.dumps({"prompt_ids": [1], "values": {**VALUES, "nonsense": 1}}).encode() + b"\n", "bad stream request"),
])
def test_a_bad_request_gets_one_invalid_line(served, line, named):
    reply = raw_exchange(served.path, line)
    assert reply["kind"] == "invalid" and named in reply["error"], reply


def test_the_client_refuses_what_the_server_refuses(served):
    with pytest.raises(StreamFailed, match="temperature") as failed:
        list(stream_events(served.path, [1], TOO_HOT, lambda: False))
    assert failed.value.kind == "invalid"


def test_no_server_is_unavailable_not_a_bug(tmp_path):
    with pytest.raises(StreamFailed) as failed:
        list(stream_events(tmp_path / "none.sock", [1], VALUES, lambda: False))
    assert failed.value.kind == "unavailable"


def piece(text: str, ids: list[int], finish: str | None = None, logprobs: bool = False) -> dict:
    return {"text": text, "tokens": len(ids), "prompt_tokens": 3, "finish_reason": finish,
            "logprobs": [{"token": str(i), "logprob": -1.0, "top": []} for i in ids] if logprobs else None,
            "token_ids": ids}


def serve_bytes(path: Path, parts: list[bytes]) -> threading.Thread:
    """A stand-in for the generator's socket: reads the request line, then sends `parts`,
    each with one sendall, and closes."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            conn.makefile("rb").readline()
            for part in parts:
                conn.sendall(part)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def lines_of(pieces: list[dict]) -> bytes:
    return b"".join(json.dumps(p).encode() + b"\n" for p in pieces)


def test_pieces_that_arrive_together_are_one_piece_with_everything_in_order(tmp_path):
    sent = [piece("a", [1], logprobs=True), piece("bc", [2, 3], logprobs=True), piece("d", [4], "length", True)]
    thread = serve_bytes(tmp_path / "s.sock", [lines_of(sent)])  # one write: one read on the other side
    (got,) = list(stream_events(tmp_path / "s.sock", [1], VALUES, lambda: False))
    thread.join(10)
    assert got["text"] == "abcd" and got["tokens"] == 4 and got["token_ids"] == [1, 2, 3, 4]
    assert [entry["token"] for entry in got["logprobs"]] == ["1", "2", "3", "4"]
    assert got["finish_reason"] == "length" and got["prompt_tokens"] == 3


def test_an_error_after_pieces_comes_after_them(tmp_path):
    sent = lines_of([piece("a", [1]), piece("b", [2])]) + json.dumps({"error": "engine died", "kind": "internal"}).encode() + b"\n"
    thread = serve_bytes(tmp_path / "s.sock", [sent])
    events = stream_events(tmp_path / "s.sock", [1], VALUES, lambda: False)
    first = next(events)
    with pytest.raises(StreamFailed, match="engine died") as failed:
        next(events)
    thread.join(10)
    assert first["text"] == "ab" and first["token_ids"] == [1, 2] and failed.value.kind == "internal"


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(min_size=0, max_size=5), min_size=1, max_size=12), cuts=st.lists(st.integers(0, 10**6), max_size=8),
       logprobs=st.booleans())
def test_however_the_bytes_are_cut_nothing_is_lost_or_reordered(texts, cuts, logprobs):
    """A property of the merging: the pieces read, joined, are the pieces sent, whatever
    the writes' boundaries (even inside a line or a UTF-8 character's JSON escape)."""
    sent = [piece(text, [i], "stop" if i == len(texts) - 1 else None, logprobs) for i, text in enumerate(texts)]
    raw = lines_of(sent)
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    parts = [raw[a:b] for a, b in zip(points, points[1:]) if b > a]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.sock"
        thread = serve_bytes(path, parts)
        got = list(stream_events(path, [1], VALUES, lambda: False))
        thread.join(10)
    assert "".join(p["text"] for p in got) == "".join(texts)
    assert [i for p in got for i in p["token_ids"]] == list(range(len(texts)))
    assert sum(p["tokens"] for p in got) == len(texts)
    assert [p["finish_reason"] for p in got] == [None] * (len(got) - 1) + ["stop"]
    if logprobs:
        assert [e["token"] for p in got for e in p["logprobs"]] == [str(i) for i in range(len(texts))]
    else:
        assert all(p["logprobs"] is None for p in got)


@contextmanager
def running_hand_off():
    """A HandOff onto a loop running on its own thread, as the socket server's; `wakeups`
    counts the loop's wake-ups. Yields (the loop, run a coroutine on it, hand_off, wakeups)."""
    loop = asyncio.new_event_loop()
    hand_off, wakeups = HandOff(loop), []
    deliver = hand_off._deliver
    hand_off._deliver = lambda: (wakeups.append(1), deliver())
    runner = threading.Thread(target=loop.run_forever, daemon=True)
    runner.start()
    try:
        yield loop, (lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(10)), hand_off, wakeups
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join(10)
        loop.close()


async def new_queues(count: int) -> list[asyncio.Queue]:
    return [asyncio.Queue() for _ in range(count)]


async def drain(queues: list[asyncio.Queue], counts: list[int]) -> list[list]:
    return [[await queue.get() for _ in range(count)] for queue, count in zip(queues, counts)]


@settings(max_examples=30, deadline=None)
@given(streams=st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_the_hand_off_delivers_every_piece_once_and_in_order(streams):
    """Engine threads hand pieces to the socket server's loop in bursts (HandOff): each
    connection's queue gets exactly its pieces, in the order they were put, however the
    threads interleave; never more wake-ups of the loop than pieces."""
    with running_hand_off() as (_, on_loop, hand_off, wakeups):
        queues = on_loop(new_queues(len(streams)))
        start = threading.Barrier(len(streams))

        def engine(index: int, count: int) -> None:
            start.wait()
            for n in range(count):
                hand_off.put(queues[index], (index, n))

        threads = [threading.Thread(target=engine, args=(i, count)) for i, count in enumerate(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        got = on_loop(drain(queues, streams))
    assert got == [[(i, n) for n in range(count)] for i, count in enumerate(streams)]
    assert 1 <= len(wakeups) <= sum(streams)


def test_pieces_handed_over_while_the_loop_is_busy_cost_one_wake_up():
    with running_hand_off() as (loop, on_loop, hand_off, wakeups):
        (queue,) = on_loop(new_queues(1))
        busy = threading.Event()
        loop.call_soon_threadsafe(busy.wait, 10)  # the loop held up, as by vLLM's output handling
        for n in range(64):
            hand_off.put(queue, n)
        busy.set()
        got = on_loop(drain([queue], [64]))
    assert got == [list(range(64))] and len(wakeups) == 1
