"""Hostile input against the real server: nothing an anonymous client sends restarts it,
every error is clean JSON and counted, and the door closes what is never finished."""
from __future__ import annotations

import json
import re
import select
import socket
import time
import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import error_text, SESSION_TOKEN_BUDGET

pytestmark = pytest.mark.server

# Values vLLM itself refuses (its SamplingParams checks), per field.
ENGINE_REFUSED = [("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
                  ("repetition_penalty", 0), ("frequency_penalty", 2.5), ("frequency_penalty", -3)]


def shim_metrics(server) -> dict:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def count(samples, route, status, method="POST") -> float:
    return samples.get(("llm_shim_requests_total", (("method", method), ("route", route), ("status", str(status)))), 0)


def failures(samples) -> float:
    return samples.get(("llm_shim_model_failures_total", ()), 0)


def tritonserver_pid(server) -> int:
    return next(c.pid for c in psutil.Process(server.process.pid).children(recursive=True) if c.name() == "tritonserver")


def routes_with(field, value):
    """The same setting on every route that takes it."""
    openai_name = field
    return [
        ("/predict", {"prompt": "hi", field: value}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], openai_name: value}),
        ("/v1/completions", {"prompt": "hi", openai_name: value}),
    ]


@pytest.mark.parametrize("field, value", ENGINE_REFUSED)
def test_every_engine_refused_value_is_a_400_on_every_route_and_never_a_failure(server, field, value):
    before = shim_metrics(server)
    for route, body in routes_with(field, value):
        status, reply = server.post(route, body)
        assert status == 400, (route, reply)
        assert error_text(reply).startswith(f"{field} must be in "), reply
    assert failures(shim_metrics(server)) == failures(before)


@pytest.mark.parametrize("field, value", ENGINE_REFUSED)
def test_engine_refused_values_sent_past_the_shim_are_the_requests_fault_in_triton(server, triton, field, value):
    """The shim refuses these itself, so the test above holds by construction. Here each value
    goes to Triton's ensemble directly, as a tritonclient user sends it: Triton answers 400
    naming the field (the request's fault, which the shim never counts toward a restart), not
    500, and the generator keeps serving."""
    import numpy as np
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    from preprocess.contract import SETTINGS

    inputs = []
    setting = SETTINGS[field]
    for name, array, kind in (("prompt", np.array([[b"hi"]], dtype=np.object_), "BYTES"),
                              (field, np.array([[value]], dtype=setting.numpy_type), setting.triton_type)):
        tensor = triton_http.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("llm", inputs)
    assert raised.value.status() == "400", (raised.value.status(), raised.value.message())
    assert field in raised.value.message(), raised.value.message()
    assert server.post("/predict", {"prompt": "still here"})[0] == 200


def test_five_engine_refused_requests_over_8_s_restart_nothing(server):
    """The report's case: three 502s 3 s apart restarted tritonserver. Spaced past the
    restart rule's 5-second window, on an idle server."""
    pid, before = tritonserver_pid(server), shim_metrics(server)
    for i in range(5):
        status, _ = server.post("/predict", {"prompt": "hi", "temperature": 2.5})
        assert status == 400
        assert server.get("/")[1]["status"] == "ok"
        time.sleep(1.6)
    after = shim_metrics(server)
    assert failures(after) == failures(before)
    assert after.get(("llm_shim_server_restarts_total", ()), 0) == before.get(("llm_shim_server_restarts_total", ()), 0)
    assert tritonserver_pid(server) == pid
    assert server.post("/predict", {"prompt": "still here"})[0] == 200


@pytest.mark.parametrize("route", ["/predict", "/v1/chat/completions", "/explain"])
def test_deeply_nested_json_is_a_400_without_a_traceback(server, route):
    before = shim_metrics(server)
    log_before = len(server.log_text())
    for depth in (40, 1000, 100_000):
        status, body = server.post(route, ('{"prompt": ' + "[" * depth + "]" * depth + "}").encode())
        assert status == 400 and "nested" in error_text(body), body
    assert count(shim_metrics(server), route, 400) - count(before, route, 400) == 3
    assert "Traceback" not in server.log_text()[log_before:]



def test_nesting_is_allowed_up_to_32_levels_exactly(server):
    """The body object is level 1: 31 brackets inside it are 32 levels, read as a body (and
    refused for its shape, not its depth); 32 brackets are 33 levels, refused as nested."""
    from shim.bodies import JSON_MAX_DEPTH

    def nested(brackets: int):
        return server.post("/predict", ('{"prompt": ' + "[" * brackets + "]" * brackets + "}").encode())

    status, body = nested(JSON_MAX_DEPTH - 1)
    assert 400 <= status < 500 and "nested" not in error_text(body) and "prompt" in error_text(body), body
    status, body = nested(JSON_MAX_DEPTH)
    assert status == 400 and f"nested more than {JSON_MAX_DEPTH} levels deep" in error_text(body), body

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_only_json_bodies_are_accepted(server, content_type):
    """A cross-site page can POST text/plain or a form without a preflight; never JSON."""
    headers = {"content-type": content_type} if content_type else {}
    request = urllib.request.Request(server.url + "/predict", data=json.dumps({"prompt": "x"}).encode(),
                                     method="POST", headers=headers)
    if content_type is None:
        request.remove_header("Content-type")
        request.unredirected_hdrs.pop("Content-type", None)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 415 and "application/json" in error_text(json.loads(caught.value.read()))


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_new_tokens": "4"}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 4.5}, "max_new_tokens"),
    ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "top_k": True}, "top_k"),
])
def test_strict_types_are_a_422_naming_the_field(server, body, field):
    status, reply = server.post("/predict", body)
    assert status == 422 and error_text(reply).startswith(field), reply


def test_every_status_is_counted_with_its_route(server):
    before = shim_metrics(server)
    server.post("/predict", b'{"prompt": ')  # 400
    server.post("/predict", {"prompt": 5})  # 422
    server.post("/predict", {"prompt": "x", "temperature": 9})  # 400
    server.post("/predict", {"prompt": ["x"] * 5000})  # 413
    server.post("/system_prompt/", {"system_prompt": "x"})  # 404, unmatched
    after = shim_metrics(server)
    assert count(after, "/predict", 400) - count(before, "/predict", 400) == 2
    assert count(after, "/predict", 422) - count(before, "/predict", 422) == 1
    assert count(after, "/predict", 413) - count(before, "/predict", 413) == 1
    assert count(after, "unmatched", 404) - count(before, "unmatched", 404) == 1


def test_no_redirect_built_from_the_host_header(server):
    request = urllib.request.Request(server.url + "/system_prompt/", data=b'{"system_prompt": "x"}', method="POST",
                                     headers={"content-type": "application/json", "host": "evil.example"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 404 and caught.value.headers.get("location") is None
    assert error_text(json.loads(caught.value.read()))


def test_work_budget_refuses_oversized_requests_on_every_route(server):
    """Counted as prompt tokens after the template plus prompts x n x new tokens."""
    cases = [
        ("/predict", {"prompt": ["q"] * 200, "max_new_tokens": 100}),
        ("/v1/completions", {"prompt": "q", "n": 16, "max_tokens": SESSION_TOKEN_BUDGET // 16 + 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "n": 8,
                                  "max_tokens": SESSION_TOKEN_BUDGET // 8 + 1}),
    ]
    for route, body in cases:
        status, reply = server.post(route, body)
        assert status == 413 and "SHIM_MAX_REQUEST_TOKENS" in error_text(reply), (route, reply)
    # One token over: the 413 counts the prompt's tokens as the engine gets them, once for n choices.
    status, reply = server.post("/v1/completions", {"prompt": "q", "max_tokens": 1})
    prompt_tokens, n = reply["usage"]["prompt_tokens"], 16
    over = (SESSION_TOKEN_BUDGET - prompt_tokens) // n + 1
    status, reply = server.post("/v1/completions", {"prompt": "q", "n": n, "max_tokens": over})
    assert status == 413 and f"up to {prompt_tokens + n * over} tokens of work" in error_text(reply), reply
    status, reply = server.post("/v1/completions", {"prompt": "q", "n": n, "max_tokens": 1})
    assert status == 200 and len(reply["choices"]) == n


def test_openai_rows_count_prompts_times_n_against_the_prompt_limit(server):
    status, reply = server.post("/v1/completions", {"prompt": ["q"] * 300, "n": 16, "max_tokens": 1})
    assert status == 413 and "SHIM_MAX_BATCH_PROMPTS" in error_text(reply)


def test_explain_refuses_a_prompt_longer_than_the_model(server):
    too_long = "word " * 3000  # the tiny model's length is 1024 tokens
    status, body = server.post("/explain", {"prompt": too_long})
    assert status == 400 and "model length" in error_text(body)
    assert server.post("/predict", {"prompt": too_long})[0] == 400


def connect(server):
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def read_all(sock) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a_half_sent_head_is_answered_408_and_closed(server):
    sock = connect(server)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
    reply = read_all(sock)  # returns once the server closes the connection
    assert reply.startswith(b"HTTP/1.1 408") and b"SHIM_HEADER_TIMEOUT_S" in reply


def test_a_body_shorter_than_its_length_is_answered_408_and_closed(server):
    sock = connect(server)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\": ")
    reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"SHIM_BODY_TIMEOUT_S" in reply
    # The body was never read to its end: the answer ends the connection, so a client that
    # goes on sending cannot hold it open (each byte would cancel the keep-alive timer).
    assert b"connection: close" in reply.lower(), reply[:300]


def trickle(sock, data: bytes, gap_s: float, bound_s: float) -> bytes:
    """Sends `data` a byte every `gap_s`, never finishing it within `bound_s`, and returns what
    the server answered (b"" when it answered nothing within the bound)."""
    deadline = time.monotonic() + bound_s
    for byte in data:
        if time.monotonic() > deadline:
            return b""
        if select.select([sock], [], [], gap_s)[0]:  # the server spoke (or closed): stop sending
            return read_all(sock)
        try:
            sock.sendall(bytes([byte]))
        except OSError:  # closed under us: read what it said
            return read_all(sock)
    return b""


@pytest.mark.parametrize("sent, trickled, variable", [
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a" * 10_000, "SHIM_HEADER_TIMEOUT_S"),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n",
     b"{" * 10_000, "SHIM_BODY_TIMEOUT_S"),
], ids=["head", "body"])
def test_a_trickled_head_or_body_meets_the_door_timeout_though_bytes_keep_coming(server, sent, trickled, variable):
    """The door's timeouts bound a whole head and a whole body, not the gap between bytes: a
    client that sends the rest a byte every 0.2 s gets the 408 naming the limit, and its
    connection closed, before three times the limit."""
    limit = float(server.env[variable])
    sock = connect(server)
    sock.sendall(sent)
    reply = trickle(sock, trickled, 0.2, 3 * limit + 5)
    assert reply.startswith(b"HTTP/1.1 408") and variable.encode() in reply, reply[:300]
    assert b"connection: close" in reply.lower(), reply[:300]


def read_one_answer(sock) -> bytes:
    """Reads one HTTP answer with a content-length, leaving the connection as it is."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole answer: {data[:300]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
], ids=["length", "chunked"])
def test_an_answer_given_before_the_body_was_read_ends_the_connection(server, head):
    """A request answered without its declared body being read (a GET that declares one): the
    server closes the connection after the answer, so a client that goes on sending that body a
    byte every 0.2 s cannot hold the connection open (each byte would cancel the keep-alive
    timer, and the rest of the body would be read and dropped with no deadline)."""
    sock = connect(server)
    sock.sendall(head)
    assert read_one_answer(sock).startswith(b"HTTP/1.1 200")
    closed = False
    for _ in range(100):  # 20 s of trickling at most; the close comes with the answer
        if select.select([sock], [], [], 0.2)[0]:
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            break
        try:
            sock.sendall(b"a")
        except OSError:
            closed = True
            break
    assert closed, "the connection stayed open while the client trickled a body nobody reads"


def test_a_huge_header_is_refused(server):
    """Over SHIM_MAX_HEADER_BYTES (64 KiB): a 431 naming the limit, never an answer to the
    request. The head is sent whole and at once, so the server has read all of it before it
    answers and closes (a client still sending when the server closes gets a reset instead)."""
    sock = connect(server)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000)
    reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431") and b"SHIM_MAX_HEADER_BYTES" in reply, reply[:300]
    sock = connect(server)  # a head just under the limit is served
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
    assert read_all(sock).startswith(b"HTTP/1.1 200")


def test_a_client_gone_mid_body_leaves_no_traceback(server):
    log_before = len(server.log_text())
    before = shim_metrics(server)
    sock = connect(server)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
    time.sleep(0.5)
    sock.close()
    deadline = time.monotonic() + 30
    while count(shim_metrics(server), "/predict", 499) == count(before, "/predict", 499) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count(shim_metrics(server), "/predict", 499) - count(before, "/predict", 499) == 1
    text = server.log_text()[log_before:]
    assert "Traceback" not in text and "ClientDisconnect" not in text
