"""The generator's streaming socket, without Triton: where it listens, what it refuses, and
how a client sees a server that is not there (the served path is in test_openai_stream)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from preprocess.engine.generation import client_error
from preprocess.engine.stream_socket import UNIX_PATH_MAX, StreamFailed, StreamServer, socket_path, stream_events


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
