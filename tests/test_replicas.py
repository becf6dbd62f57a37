"""A plain tritonserver, started with the README's command, serving two generator replicas
(two real vLLM engines on CPU), and the shim attached to it by TRITON_URL.

Covers: the documented command works outside `./build.sh serve`; a judge list is shared
evenly by the replicas and answered in order; health and metrics per replica; one
replica's engine killed: the other keeps answering, health says `degraded`, and the dead
one comes back on its own; `kill -9` of the tritonserver leaves no engine and no shared
memory (tests/test_orphans.py has Ctrl-C of the serve entry); faults injected into a shim route and
into a replica's engine (tests/faults/) answered as docs/operations.md says; thinking split out
of /v1 chat answers by vLLM's Qwen3 reasoning parser (REASONING_PARSER=qwen3 on this server only).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from shim.serve import OWN_PROCESS_GROUP

from .conftest import (ARTIFACTS, REPO, TINY_ANSWER, TINY_MODEL, free_port, http_json, scrape_metrics, server_env,
                       start_server, stop_process, stop_server, wait_for)
from .faults.overlay import fault_overlay
from .faults.sitecustomize import FAULT_SEED
from .test_orphans import BOUND_S, assert_nothing_left, engine_tree

pytestmark = pytest.mark.server

# README, "Triton on its own": the same two lines.
README_ENV = 'eval "$(./build.sh env)"'
README_SERVER = 'exec tritonserver --model-repository model_repository --backend-directory "$TRITON_HOME/backends"'
PLAIN_TRITON = f"{README_ENV} && {README_SERVER}"
# The one addition for the faults: the overlay's bin ahead of the venv's (tests/faults/overlay.py).
ARMED_TRITON = f'{README_ENV} && export PATH="$FAULTS_BIN:$PATH" && {README_SERVER}'
CODE_LIMIT = 3  # a question that routes to code gets 3 tokens, the others 1: the order shows


def waited(check, timeout_s: float, what: str):
    value = wait_for(check, timeout_s)
    assert value, f"{what}: not within {timeout_s:.0f} s"
    return value


class PlainTriton:
    """tritonserver started with the README's command, outside the shim's supervision."""

    def __init__(self, env: dict):
        self.env = env
        self.ports = [env[f"TRITON_{p}_PORT"] for p in ("HTTP", "GRPC", "METRICS")]
        self.process: subprocess.Popen | None = None
        self.command = ARMED_TRITON if "FAULTS_BIN" in env else PLAIN_TRITON

    def start(self) -> None:
        http, grpc, metrics = self.ports
        with open(ARTIFACTS / "plain-tritonserver.log", "a") as log:
            self.process = subprocess.Popen(
                ["bash", "-c", f"{self.command} --http-port={http} --grpc-port={grpc} --metrics-port={metrics}"],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, **OWN_PROCESS_GROUP)

    def stop(self) -> None:
        """SIGTERM, then whatever of its process group is left: a tritonserver that runs out
        its exit timeout ends the stubs hard, and their vLLM engine processes outlive them
        (./build.sh serve kills the group for the same reason)."""
        stop_process(self.process, signal.SIGTERM)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def replicated(tiny_model, tmp_path_factory):
    # The judge's 650 questions count their prompt tokens (about 100 each with the default
    # system prompt): the product's default work limit, not the session's small one.
    env = server_env(tiny_model, DATA_PARALLEL_SIZE="2", MAX_NEW_TOKENS="1", MAX_NEW_TOKENS_CODE="1",
                     MAX_NEW_TOKENS_CODE_SOFT=str(CODE_LIMIT), SHIM_MAX_REQUEST_TOKENS="1048576",
                     SHIM_MAX_QUEUED_TOKENS="4194304", PYTHONPATH=str(REPO / "tests" / "faults"),
                     FAULTS_BIN=str(fault_overlay(tmp_path_factory.mktemp("fault-overlay") / "venv")),
                     # vLLM's Qwen3 parser (tests/test_openai_reasoning.py); SmolLM2's tokenizer has no
                     # thinking tags, so `auto` leaves the split off, as in the session's server.
                     REASONING_PARSER="qwen3")
    (ARTIFACTS / "plain-tritonserver.log").write_text("")
    triton = PlainTriton(env)
    triton.start()
    shim = None
    try:
        # The shim attaches by URL and shares the runtime folder (per-replica health, aborts).
        shim_env = {**env, "TRITON_URL": f"http://127.0.0.1:{triton.ports[0]}", "PORT": str(free_port()),
                    "TRITON_GRPC_URL": f"grpc://127.0.0.1:{triton.ports[1]}"}
        shim = start_server(shim_env, "attached-shim.log", [sys.executable, "-m", "shim.serve"])
        shim.metrics_url = f"http://127.0.0.1:{triton.ports[2]}/metrics"
        shim.triton = triton
        yield shim
    finally:
        if shim is not None:
            stop_server(shim)
        triton.stop()


def per_replica(metrics: dict, name: str) -> list[float]:
    return [metrics.get(f"{name}{{replica={r}}}", 0.0) for r in "01"]


def test_the_plain_tritonserver_serves_the_ensemble(replicated):
    import numpy as np
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(replicated.env["TRITON_URL"].removeprefix("http://"))
    prompt = triton_http.InferInput("prompt", [1, 1], "BYTES")
    prompt.set_data_from_numpy(np.array([[b"hello"]], dtype=np.object_))
    answer = client.infer("llm", [prompt]).as_numpy("answer").reshape(-1)[0].decode()
    assert answer == "GPU"
    info = replicated.get("/info")[1]
    assert [(r["replica"], r["gpus"], r["ready"]) for r in info["replicas"]] == [(0, [], True), (1, [], True)]
    assert info["triton_url"] == replicated.env["TRITON_URL"].removeprefix("http://")
    assert len({r["engine_pid"] for r in info["replicas"]}) == 2  # two engines
    # ENGINE_FRONTEND=auto: with two replicas, each AsyncLLM in a process of its own
    assert info["frontend"] == "process" and len({r["frontend_pid"] for r in info["replicas"]} - {None}) == 2
    assert replicated.get("/")[1] == {"status": "ok"}


def test_the_attached_shim_streams_through_the_grpc_url(replicated):
    import openai

    client = openai.OpenAI(base_url=replicated.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = list(client.completions.create(model=TINY_MODEL.name, prompt="hello", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == " GPU" * 3
    assert chunks[-1].choices[0].finish_reason == "length"


def test_an_exception_that_escapes_a_route_is_a_counted_json_500_and_the_shim_serves_on(replicated):
    """docs/operations.md: an exception that escapes a route is a JSON 500, counted."""
    counted = "llm_shim_requests_total{method=GET,route=/info,status=500}"
    before = scrape_metrics(replicated.url + "/metrics").get(counted, 0)
    escaped = http_json("GET", replicated.url + "/info", headers={"x-inject-fault": "1"}, timeout=60)
    assert escaped == (500, {"error": "internal error in the shim"}), escaped
    assert scrape_metrics(replicated.url + "/metrics").get(counted, 0) == before + 1
    assert "unhandled error on GET /info" in replicated.log_text()

    assert replicated.get("/info")[0] == 200  # the positive control: the same request without the fault
    assert replicated.post("/predict", {"prompt": "still serving?"}) == (200, {"response": "GPU"})


def test_an_internal_error_in_the_generator_is_a_502_without_internals_and_serving_goes_on(replicated):
    """docs/operations.md: internal errors reach the client as "internal error in the generator
    (see the server log)", without class names; the log has the detail. A 5xx makes the shim
    probe the model, and a probe that succeeds restarts nothing."""
    import openai

    restarts = "llm_shim_server_restarts_total"
    before = scrape_metrics(replicated.url + "/metrics").get(restarts, 0)
    pid = replicated.triton.process.pid
    client = openai.OpenAI(base_url=replicated.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as failed:
        client.completions.create(model=TINY_MODEL.name, prompt="hello", max_tokens=2, seed=FAULT_SEED)
    assert failed.value.status_code == 502
    message = failed.value.body["message"]
    assert "internal error in the generator (see the server log)" in message, message
    assert "RuntimeError" not in message and "injected" not in message
    waited(lambda: "RuntimeError: injected fault in the generator" in
           (ARTIFACTS / "plain-tritonserver.log").read_text(errors="replace"), 30, "the detail in the server log")
    # The positive control: the same request with another seed, and the judge's route.
    again = client.completions.create(model=TINY_MODEL.name, prompt="hello", max_tokens=2, seed=FAULT_SEED + 1)
    assert again.choices[0].text == " GPU GPU"
    assert replicated.post("/predict", {"prompt": "still serving?"}) == (200, {"response": "GPU"})
    assert scrape_metrics(replicated.url + "/metrics").get(restarts, 0) == before
    assert replicated.triton.process.poll() is None and replicated.triton.process.pid == pid


# Thinking as `reasoning_content` on /v1 chat, split by vLLM's Qwen3 parser (REASONING_PARSER),
# read with the official `openai` package. The tiny model never thinks by itself, so a JSON
# schema whose one value holds a thinking block makes it write one: real generated tokens,
# the tags cut across them as the tokenizer cuts them, through preprocess, the generator,
# postprocess and the stream (which carries the pieces' token ids to the parser). The JSON
# string's opening quote comes before the tag, and Qwen3's parser (thinking from the first
# token, as in `vllm serve`) counts it as thinking: reasoning `"plan it`, content `Paris"`.
THOUGHT, ANSWER = "plan it", "Paris"
SPLIT = (f'"{THOUGHT}', f'{ANSWER}"')
FORCED = {"type": "json_schema", "json_schema": {"name": "t", "schema": {
    "type": "string", "enum": [f"<think>{THOUGHT}</think>{ANSWER}"]}}}
QUESTION = [{"role": "user", "content": "Where?"}]
THINKING_OFF = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def chat(replicated):
    import openai

    return openai.OpenAI(base_url=replicated.url + "/v1", api_key="unused", max_retries=0, timeout=120).chat.completions


def streamed_parts(stream) -> tuple[str, str]:
    thought, content = [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        thought.append((delta.model_extra or {}).get("reasoning_content") or "")
        content.append(delta.content or "")
        assert "<think>" not in content[-1] and "</think>" not in thought[-1] + content[-1]
    return "".join(thought), "".join(content)


def test_thinking_comes_back_apart_from_the_answer(chat):
    reply = chat.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=40, response_format=FORCED)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop"
    assert (message.model_extra["reasoning_content"], message.content) == SPLIT


def test_a_stream_sends_the_thinking_as_reasoning_deltas(chat):
    stream = chat.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=40, response_format=FORCED, stream=True)
    assert streamed_parts(stream) == SPLIT


def test_an_agent_framework_reads_the_thinking_apart_whole_and_streamed(replicated):
    """The second, independent client: LangChain's ChatDeepSeek (langchain-deepseek), which
    reads `reasoning_content` where ChatOpenAI drops it by design, pointed at this server."""
    from langchain_core.messages import HumanMessage
    from langchain_deepseek import ChatDeepSeek

    chat = ChatDeepSeek(base_url=replicated.url + "/v1", api_key="unused", model=TINY_MODEL.name, max_tokens=40,
                        max_retries=0, timeout=120).bind(response_format=FORCED)
    said = chat.invoke([HumanMessage("Where?")])
    assert (said.additional_kwargs.get("reasoning_content"), said.content) == SPLIT, said
    streamed = None
    for chunk in chat.stream([HumanMessage("Where?")]):
        streamed = chunk if streamed is None else streamed + chunk
    assert (streamed.additional_kwargs.get("reasoning_content"), streamed.content) == SPLIT, streamed


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_with_no_tags_is_thinking_as_vllms_qwen3_parser_reads_it(chat, stream):
    """Thinking on (the template's default), vLLM's parser reads everything before `</think>`
    as thinking, as `vllm serve --reasoning-parser qwen3` does; turned off by the request's
    `chat_template_kwargs`, the parser is built with it off and everything is content."""
    for extra, expected in ((None, (TINY_ANSWER * 3, "")), (THINKING_OFF, ("", TINY_ANSWER * 3))):
        reply = chat.create(model=TINY_MODEL.name, messages=QUESTION, max_tokens=3, stream=stream, extra_body=extra)
        if stream:
            assert streamed_parts(reply) == expected, extra
            continue
        message = reply.choices[0].message
        said = (message.model_extra["reasoning_content"] or "", message.content or "")
        assert said == (expected[0], expected[1].strip()), extra  # clean-up trims the content only


def test_a_judge_list_is_shared_evenly_and_answered_in_order(replicated):
    prompts = [f"写一段代码 {i}" if i % 3 == 0 else f"question {i}" for i in range(650)]
    before = scrape_metrics(replicated.metrics_url)
    status, body = replicated.post("/predict", {"prompt": prompts}, timeout=300)
    assert status == 200 and len(body["response"]) == 650
    expected = [" ".join(["GPU"] * (CODE_LIMIT if i % 3 == 0 else 1)) for i in range(650)]
    assert body["response"] == expected  # every answer in its question's place
    # Prompts count when a part is submitted; tokens, and the KV-cache figures with them,
    # when its answers are done, which the stub's metrics thread may apply after the reply.
    tokens = sum(CODE_LIMIT if i % 3 == 0 else 1 for i in range(650))

    def grown(metrics, name):
        return sum(per_replica(metrics, name)) - sum(per_replica(before, name))

    def counted():
        metrics = scrape_metrics(replicated.metrics_url)
        done = (grown(metrics, "llm_generator_prompts_total") >= 650
                and grown(metrics, "llm_generator_generation_tokens_total") >= tokens)
        return metrics if done else None

    after = waited(counted, 60, "the generator's figures")
    shares = [a - b for a, b in zip(per_replica(after, "llm_generator_prompts_total"),
                                    per_replica(before, "llm_generator_prompts_total"))]
    # Two even requests of 325, each split by load: 325 each, or 324/326 when the first part
    # was answered before the second request arrived.
    assert sum(shares) == 650 and abs(shares[0] - shares[1]) <= 2, shares
    # The KV-cache figures come from each replica's front-end process (its "kv" messages).
    blocks = replicated.get("/info")[1]["scheduler"]["kv_cache_blocks"]
    assert blocks > 0 and per_replica(after, "llm_generator_kv_cache_blocks_total") == [blocks, blocks]


def test_one_replica_down_the_other_serves_and_it_comes_back(replicated):
    info = replicated.get("/info")[1]
    victim = info["replicas"][1]
    restarts_before = victim["restarts"]
    os.kill(victim["engine_pid"], signal.SIGKILL)
    # Seen while it is down: the rebuild (a whole engine start) is the window, on any machine.
    waited(lambda: per_replica(scrape_metrics(replicated.metrics_url), "llm_generator_engine_up") == [1, 0],
           60, "engine_up saying [1, 0]")
    health = waited(lambda: (h := replicated.health_body()).get("status") == "degraded" and h,
                    60, "health saying degraded")
    assert health == {"status": "degraded", "replicas_up": 1, "replicas": 2}
    before = scrape_metrics(replicated.metrics_url)
    status, body = replicated.post("/predict", {"prompt": [f"while one is down {i}" for i in range(20)]})
    assert status == 200 and body["response"] == ["GPU"] * 20

    def shares():
        grown = [a - b for a, b in zip(per_replica(scrape_metrics(replicated.metrics_url), "llm_generator_prompts_total"),
                                       per_replica(before, "llm_generator_prompts_total"))]
        return grown if sum(grown) >= 20 else None

    assert waited(shares, 60, "the prompts counted") == [20, 0]  # the other replica answered all
    waited(lambda: replicated.health() == "ok", 240, "health back to ok")
    replicas = replicated.get("/info")[1]["replicas"]
    assert [r["ready"] for r in replicas] == [True, True]
    assert replicas[1]["restarts"] == restarts_before + 1 and replicas[1]["engine_pid"] != victim["engine_pid"]
    assert replicas[0]["restarts"] == info["replicas"][0]["restarts"]  # the other one was never touched
    assert per_replica(scrape_metrics(replicated.metrics_url), "llm_generator_engine_up") == [1, 1]


def test_a_placement_that_does_not_fit_stops_start_up_with_one_line(tmp_path, tiny_model):
    """Fault injection: an nvidia-smi that lists two GPUs (the real output format)."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    env = server_env(tiny_model, TENSOR_PARALLEL_SIZE="2", DATA_PARALLEL_SIZE="2",
                     PATH=f"{tmp_path}:{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-m", "shim.serve"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "[serve] ERROR DATA_PARALLEL_SIZE=2 x TENSOR_PARALLEL_SIZE=2 needs 4 GPUs; there are 2 visible GPUs (0,1)")


def test_the_attached_shim_follows_its_triton_away_and_back(replicated):
    """Same health, warm-up and recovery as under ./build.sh serve, except that the shim does
    not restart a server it did not start: its owner does (here, the test)."""
    replicated.triton.stop()
    # Its HTTP front end stopped before its exit timeout ran out: the shim's readiness probe
    # runs on a connection of its own (EnsembleClient.ready), so the shim noticed and let go of
    # its pooled ones (let_go_when_idle, tests/unit/test_ensemble_client.py). With the probe on
    # a pooled connection Triton waits the whole 30 s and logs "Timeout 0: Found 0 model versions ...".
    stopping = (ARTIFACTS / "plain-tritonserver.log").read_text(errors="replace").rsplit("Signal (15) received.", 1)[1]
    left = re.search(r"Timeout (\d+): Found \d+ model versions that have in-flight inferences", stopping)
    assert left and int(left[1]) > 0, stopping[:3000]
    waited(lambda: replicated.health() == "warming", 60, "health leaving ok")
    status, body = replicated.post("/predict", {"prompt": "while Triton is gone"}, timeout=60)
    assert status == 503 and "unavailable" in body["error"], body
    assert "restarting tritonserver" not in replicated.log_text()
    replicated.triton.start()
    waited(lambda: replicated.health() == "ok", 240, "health back to ok")
    assert replicated.post("/predict", {"prompt": ["back", "again"]}) == (200, {"response": ["GPU", "GPU"]})


def test_kill_9_of_the_plain_tritonserver_leaves_no_engine_and_no_shared_memory(replicated):
    """Last in this file: it ends the module's tritonserver (two replicas, two engines). Only
    what this server's processes map is judged (engine_tree), not what the SIGTERM-then-kill of
    the previous test left (PlainTriton.stop says why), which the session's end clears."""
    # `exec tritonserver`: the shell's pid is tritonserver's
    tree, segments = engine_tree(replicated.triton.process.pid)
    os.kill(replicated.triton.process.pid, signal.SIGKILL)
    # Reaped, as its parent (a shell, tini) would: a zombie parent still answers the stubs'
    # "is my parent alive" check, and they would wait for it forever.
    replicated.triton.process.wait(BOUND_S)
    assert_nothing_left(tree, segments)
