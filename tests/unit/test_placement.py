"""Replicas from the environment: their GPUs, the one-line refusals, the even split, and a
service of two real (transformers, CPU) engines with one of them down."""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from preprocess.engine_settings import load_engine
from preprocess.engine.generation import GenerationItem
from preprocess.engine.placement import (AUTO, Replica, deal_by_answer_length, devices_for, plan_replicas,
                                         process_frontends, split_evenly, visible_devices)
from preprocess.engine.replicas import SplitRequest
from preprocess.engine.service import GeneratorService, prepare_generator_process
from preprocess.envparse import SettingsError
from preprocess.sampling import SamplingSettings


def gpus(n):
    return [str(i) for i in range(n)]


@pytest.mark.parametrize("replicas, tp, visible, expected", [
    (1, 1, gpus(2), [("0",)]),
    (AUTO, 1, gpus(2), [("0",), ("1",)]),
    (AUTO, 2, gpus(4), [("0", "1"), ("2", "3")]),
    (1, 2, gpus(2), [("0", "1")]),
    (2, 1, gpus(4), [("0",), ("1",)]),  # fewer than the GPUs: the rest stay idle
    (AUTO, 1, ["3", "GPU-5a"], [("3",), ("GPU-5a",)]),  # CUDA_VISIBLE_DEVICES as listed
])
def test_each_replica_gets_its_own_gpu_group(replicas, tp, visible, expected):
    plan = plan_replicas(replicas, tp, visible, accelerator=True)
    assert [r.devices for r in plan] == expected
    assert [r.index for r in plan] == list(range(len(expected)))
    # positions are torch's cuda:N of this process, in the same order as the devices
    assert [r.positions for r in plan] == [tuple(visible.index(d) for d in group) for group in expected]


@pytest.mark.parametrize("replicas, tp, visible, message", [
    (2, 2, gpus(2), "DATA_PARALLEL_SIZE=2 x TENSOR_PARALLEL_SIZE=2 needs 4 GPUs; there are 2 visible GPUs (0,1)"),
    (3, 1, gpus(2), "DATA_PARALLEL_SIZE=3 x TENSOR_PARALLEL_SIZE=1 needs 3 GPUs; there are 2 visible GPUs (0,1)"),
    (1, 4, gpus(2), "TENSOR_PARALLEL_SIZE=4 needs 4 GPUs; there are 2 visible GPUs (0,1)"),
    (1, 3, gpus(4), "TENSOR_PARALLEL_SIZE=3 does not divide the 4 visible GPUs (0,1,2,3); set CUDA_VISIBLE_DEVICES"),
    (AUTO, 1, [], "TENSOR_PARALLEL_SIZE=1 needs 1 GPUs; there are 0 visible GPUs (none)"),
])
def test_combinations_that_do_not_fit_stop_with_one_line(replicas, tp, visible, message):
    with pytest.raises(SettingsError) as refused:
        plan_replicas(replicas, tp, visible, accelerator=True)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_cpu_replicas_share_the_host():
    assert plan_replicas(2, 1, [], accelerator=False) == [Replica(0), Replica(1)]
    assert plan_replicas(AUTO, 1, [], accelerator=False) == [Replica(0)]


def test_visible_devices_follow_the_variable_or_the_count():
    assert visible_devices((), 2) == ["0", "1"]
    assert visible_devices(("2", "0"), 2) == ["2", "0"]
    assert visible_devices(("2", "0", "1"), 2) == ["2", "0"]  # more listed than torch sees


@pytest.mark.parametrize("raw, expected", [(None, 1), ("2", 2), ("auto", AUTO), ("AUTO", AUTO), ("0", 1)])
def test_data_parallel_size_setting(raw, expected):
    environ = {} if raw is None else {"DATA_PARALLEL_SIZE": raw}
    assert load_engine(environ).data_parallel_size == expected


def test_data_parallel_size_refuses_a_word():
    with pytest.raises(SettingsError, match=r"^DATA_PARALLEL_SIZE='two' is not an integer"):
        load_engine({"DATA_PARALLEL_SIZE": "two"})


@pytest.mark.parametrize("raw, replicas, expected", [
    (None, 1, False), (None, 2, True), ("auto", 4, True), ("process", 1, True), ("thread", 2, False)])
def test_engine_frontend_setting(raw, replicas, expected):
    environ = {} if raw is None else {"ENGINE_FRONTEND": raw}
    assert process_frontends(load_engine(environ).frontend, replicas) is expected


def test_engine_frontend_refuses_other_words():
    with pytest.raises(SettingsError, match=r"^ENGINE_FRONTEND='fork' is not one of auto, process, thread$"):
        load_engine({"ENGINE_FRONTEND": "fork"})


def test_devices_for_narrows_and_restores_the_environment():
    environ = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with devices_for(Replica(1, ("2", "3"), (2, 3)), environ):
        assert environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert environ == {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    unset: dict = {}
    with devices_for(Replica(0, ("1",), (1,)), unset):
        assert unset == {"CUDA_VISIBLE_DEVICES": "1"}
    assert unset == {}
    with devices_for(Replica(0), unset):  # CPU: untouched
        assert unset == {}


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 512), loads=st.lists(st.integers(0, 600), min_size=1, max_size=8))
def test_the_split_levels_the_loads(count, loads):
    shares = split_evenly(count, loads)
    assert sum(shares) == count and min(shares) >= 0
    after = [load + share for load, share in zip(loads, shares)]
    # every replica that got a prompt ends at most one above the lowest: nothing went to a
    # replica that was already ahead while another lagged
    for load, share, level in zip(loads, shares, after):
        if share:
            assert level <= min(after) + 1
    if len(set(loads)) == 1:  # equal loads: shares differ by at most one
        assert max(shares) - min(shares) <= 1


def test_the_judge_list_is_shared_evenly_by_two_replicas():
    """650 prompts arrive as two Triton requests (the shim's even chunks, 325 each)."""
    first = split_evenly(325, [0, 0])
    second = split_evenly(325, first)
    assert [a + b for a, b in zip(first, second)] == [325, 325]


@settings(max_examples=300, deadline=None)
@given(limits=st.lists(st.sampled_from([1, 32, 64, 192, 512]), max_size=300), replicas=st.integers(1, 8),
       loads=st.lists(st.integers(0, 600), min_size=8, max_size=8))
def test_the_deal_hands_out_every_prompt_once_in_the_shares(limits, replicas, loads):
    shares = split_evenly(len(limits), loads[:replicas])
    parts = deal_by_answer_length(limits, shares)
    assert [len(part) for part in parts] == shares
    assert sorted(p for part in parts for p in part) == list(range(len(limits)))
    assert all(part == sorted(part) for part in parts)  # each part in the request's order


@settings(max_examples=300, deadline=None)
@given(limits=st.lists(st.sampled_from([1, 32, 64, 192, 512]), max_size=300), replicas=st.integers(1, 8))
def test_even_shares_get_even_parts_of_the_long_answers(limits, replicas):
    """Whatever the order of the list (code questions grouped or not), replicas with even
    shares get counts of the answers at or above any limit that differ by at most one."""
    parts = deal_by_answer_length(limits, split_evenly(len(limits), [0] * replicas))
    for limit in set(limits):
        counts = [sum(limits[p] >= limit for p in part) for part in parts]
        assert max(counts) - min(counts) <= 1, (limit, counts)


def test_a_judge_list_with_its_code_questions_last_is_dealt_evenly():
    limits = [32] * 547 + [64] * 14 + [192] * 89  # the long answers together, at the end
    parts = deal_by_answer_length(limits, split_evenly(650, [0, 0]))
    assert [sum(limits[p] == 192 for p in part) for part in parts] == [45, 44]
    assert [len(part) for part in parts] == [325, 325]


def test_a_split_request_answers_in_the_requests_order_once():
    answers = []
    split = SplitRequest([[0, 2, 3], [1, 4]], answers.append, lambda: answers.append("cancelled"))
    split.part_done(1, ["b", "e"])
    assert answers == [] and not split.answered
    split.part_done(0, ["a", "c", "d"])
    assert answers == [["a", "b", "c", "d", "e"]]
    split.part_done(0, RuntimeError("late"))  # after the answer: nothing more
    assert answers == [["a", "b", "c", "d", "e"]]


def test_a_part_that_answers_fewer_prompts_fails_the_request():
    answers = []
    split = SplitRequest([[0, 2], [1]], answers.append, lambda: None)
    split.part_done(0, ["a"])  # one answer for two prompts
    split.part_done(1, ["b"])
    assert len(answers) == 1 and isinstance(answers[0], RuntimeError)
    assert str(answers[0]) == "an engine answered 1 of the 2 prompts it was given"


def item(max_tokens):
    return GenerationItem([1, 2, 3, 4], SamplingSettings(max_tokens, 0.0, 1.0, -1, 1.0, 0.0, ignore_eos=True))


def submit_and_wait(service, items, timeout_s=120):
    outcome, done = [], threading.Event()

    def on_done(result):
        outcome.append(result)
        done.set()

    service.submit(items, on_done)
    assert done.wait(timeout_s), "no answer"
    assert len(outcome) == 1  # answered exactly once
    return outcome[0]


class DeadRunner:
    """Fault injection: a replica whose engine process is gone (what vLLM's `errored` says)."""
    backend = "vllm"
    healthy = False
    engine_mode, engine_kwargs, scheduler = "DeadRunner", {}, {}
    max_model_len = 1024

    def shutdown(self, timeout_s):
        pass


def test_two_replicas_share_a_request_in_order_and_survive_one_down(tiny_model, tmp_path):
    """Two real transformers engines on CPU. A request's prompts are split between them and
    answered in order; with one replica down the other answers everything, health (ready)
    says not ready while `serving` stays true, and the dead one is rebuilt on its own."""
    environ = {"MODEL_DIR": str(tiny_model), "USE_VLLM": "false", "DATA_PARALLEL_SIZE": "2",
               "LLM_RUNTIME_DIR": str(tmp_path)}
    service = GeneratorService(prepare_generator_process(environ))
    try:
        assert [r.placement for r in service.replicas] == [Replica(0), Replica(1)]
        received = {0: [], 1: []}
        for replica in service.replicas:
            real = replica.runner.submit
            replica.runner.submit = (lambda items, done, real=real, index=replica.index:
                                     (received[index].append([i.sampling.max_tokens for i in items]),
                                      real(items, done))[1])
        limits = [1, 1, 1, 1, 1, 4, 4, 3, 3]  # the longest answers last, as grouped code questions
        results = submit_and_wait(service, [item(n) for n in limits])
        assert [r.completion_tokens for r in results] == limits  # the request's order
        assert sorted(len(part) for parts in received.values() for part in parts) == [4, 5]  # an even share each
        assert [sorted(received[r][0], reverse=True)[:2] for r in (0, 1)] == [[4, 3], [4, 3]]  # the long ones dealt
        assert service.ready and [r["ready"] for r in service.info()["replicas"]] == [True, True]

        second = service.replicas[1]
        second._next_attempt = time.monotonic() + 3600  # held down until the checks below are done
        second.runner = DeadRunner()
        assert not service.ready and service.serving
        received[0].clear()
        results = submit_and_wait(service, [item(n) for n in limits])
        assert [r.completion_tokens for r in results] == limits
        assert [len(part) for part in received[0]] == [9]  # replica 0 answered everything
        deadline = time.monotonic() + 30  # the watchdog looks every 0.5 s
        while service.state.status().replicas != (1, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.state.status()[:2] == (True, (1, 2))  # published for the shim
        second._next_attempt = 0.0  # let the watchdog rebuild it
        deadline = time.monotonic() + 120  # the rebuild loads the tiny model: a bound, not a timing
        while not (service.ready and second.restarts == 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.restarts == 1 and service.ready and service.info()["restarts"] == 1
        assert service.state.status().replicas == (2, 2)
        # Every answer is off the count, and a late answer of the dead engine does not count.
        assert [r.in_flight for r in service.replicas] == [0, 0] and second.engine_generation == 1
        second.add_in_flight(-5, generation=0)
        assert second.in_flight == 0
        assert service.replicas[0].restarts == 0
    finally:
        service.shutdown(5)
