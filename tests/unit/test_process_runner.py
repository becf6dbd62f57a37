"""A replica's vLLM front end in its own process (ENGINE_FRONTEND=process): a real CPU
engine behind GeneratorService, as the generator stub runs it.

Covers: answers in the items' order, streamed pieces, a refusal keeps its kind across the
process boundary, a cancel aborts a batch or a stream, and a killed front-end process fails what it held (no
request is left unanswered) and is rebuilt by the watchdog.
"""
import json
import os
import signal
import threading

import psutil
import pytest

from preprocess.contract import InvalidRequest
from preprocess.engine.generation import EngineUnavailable, GenerationItem, classify_error
from preprocess.engine.process_runner import error_from_message, error_message
from preprocess.engine.service import GeneratorService, prepare_generator_process
from preprocess.sampling import SamplingSettings

from ..conftest import TINY_ANSWER

pytestmark = pytest.mark.engine  # an engine per module, another per rebuild


def settings(max_tokens: int, **extra) -> SamplingSettings:
    return SamplingSettings(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                            frequency_penalty=0.0, ignore_eos=True, **extra)


class Outcome:
    """The one answer of a submit (or the last event of a stream), waited for."""

    def __init__(self):
        self.events, self._done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, (list, BaseException)) or getattr(event, "finish_reason", None) is not None:
            self._done.set()

    def wait(self, timeout_s: float = 120):
        assert self._done.wait(timeout_s), f"no answer in {timeout_s} s"
        return self.events[-1]


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def service(tiny_model):
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1", "MODEL_DIR": str(tiny_model), "ENGINE_FRONTEND": "process"}
    s = GeneratorService(prepare_generator_process(environ))
    yield s
    s.shutdown(10)


def test_the_engine_runs_in_a_child_process_and_answers_in_order(service):
    info = service.info()
    replica = info["replicas"][0]
    assert info["frontend"] == "process" and info["backend"] == "vllm" and info["engine_mode"] == "AsyncLLM"
    frontend = psutil.Process(replica["frontend_pid"])
    assert frontend.ppid() == os.getpid()  # a child of the stub
    assert psutil.Process(replica["engine_pid"]).ppid() == frontend.pid  # the engine core is the child's
    assert info["scheduler"]["max_num_seqs"] > 0 and info["max_model_len"] == 1024
    outcome = Outcome()
    service.submit([GenerationItem([1, 2, 3 + i], settings(i % 4 + 1)) for i in range(24)], outcome)
    results = outcome.wait()
    assert [r.completion_tokens for r in results] == [i % 4 + 1 for i in range(24)]
    assert [r.text for r in results] == [TINY_ANSWER * (i % 4 + 1) for i in range(24)]


def test_a_stream_comes_in_pieces_that_make_the_whole_answer(service):
    outcome = Outcome()
    service.stream(GenerationItem([1, 2, 3], settings(12, top_logprobs=1)), outcome)
    last = outcome.wait()
    pieces = outcome.events
    assert last.finish_reason == "length" and all(p.finish_reason is None for p in pieces[:-1])
    assert "".join(p.text for p in pieces) == TINY_ANSWER * 12 and sum(p.tokens for p in pieces) == 12
    assert sum(len(p.logprobs) for p in pieces) == 12


def test_a_schema_the_engine_refuses_stays_the_requests_fault(service):
    bad = json.dumps({"json": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}})
    outcome = Outcome()
    service.submit([GenerationItem([1, 2, 3], settings(4, response_format=bad))], outcome)
    error = outcome.wait()
    assert isinstance(error, InvalidRequest) and str(error).startswith("response_format:"), repr(error)


def test_a_cancel_aborts_the_request_in_the_child(service):
    outcome = Outcome()
    handle = service.submit([GenerationItem([1, 2, 3], settings(900))], outcome)
    service.cancel(handle)
    error = outcome.wait()
    assert classify_error(error) == "unavailable" and "cancelled" in str(error), repr(error)


def test_a_cancelled_stream_ends_with_the_cancel(service):
    first_piece, outcome = threading.Event(), Outcome()

    def listener(event):
        first_piece.set()
        outcome(event)

    handle = service.stream(GenerationItem([1, 2, 3], settings(900)), listener)
    assert first_piece.wait(120)
    service.cancel(handle)
    error = outcome.wait()
    assert classify_error(error) == "unavailable" and "cancelled" in str(error), repr(error)
    assert sum(p.tokens for p in outcome.events[:-1]) < 900  # aborted, not run to the end


@pytest.mark.parametrize("exc", [InvalidRequest("prompt 3: bad"), EngineUnavailable("restarting"),
                                 ValueError("a bug"), __import__("asyncio").CancelledError()])
def test_an_error_keeps_its_kind_across_the_pipe(exc):
    kind, text = error_message(exc, engine_healthy=True)
    assert classify_error(error_from_message(kind, text)) == classify_error(exc)
    assert str(exc) in text


def test_a_killed_front_end_is_rebuilt_and_what_it_held_is_sent_again(service):
    """Fault injection: SIGKILL of the child process while it generates 900 tokens. The
    request it held waits for the rebuilt front end and comes back whole (ENGINE_RESUBMIT_S)."""
    replica = service.replicas[0]
    victim = replica.runner.frontend_pid
    engine = psutil.Process(replica.runner.engine_pid)
    engine_tree = [engine, *engine.children(recursive=True)]
    outcome = Outcome()
    service.submit([GenerationItem([1, 2, 3], settings(900))], outcome)
    os.kill(victim, signal.SIGKILL)
    answer = outcome.wait(300)  # a bound: the rebuild, then 900 tokens
    assert isinstance(answer, list) and [r.completion_tokens for r in answer] == [900], repr(answer)[:300]
    assert replica.restarts == 1 and replica.ready, "answered by the old front end?"
    assert replica.runner.frontend_pid != victim
    assert not [p.pid for p in engine_tree if alive(p)]  # the orphaned engine core and workers were killed
    again = Outcome()
    service.submit([GenerationItem([4, 5, 6], settings(2))], again)
    assert [r.text for r in again.wait()] == [TINY_ANSWER * 2]
