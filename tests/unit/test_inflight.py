"""The generator's request bookkeeping (preprocess.engine.inflight) without Triton: each request
answered exactly once, aborted when its client goes, drained at close, and a sender that
raises does not stop the others. The Triton request and the engine are stand-ins that keep
Triton's one hard rule: asking an answered request whether it was cancelled is a crash."""
from __future__ import annotations

import threading
import time

from hypothesis import given, settings, strategies as st

from preprocess.engine.inflight import InFlight


class Request:
    def __init__(self, request_id: str):
        self.id = request_id
        self.client_gone = False
        self.answered = False

    def request_id(self) -> str:
        return self.id

    def is_cancelled(self) -> bool:
        if self.answered:  # what tritonserver does: asking about an answered request crashes it
            raise RuntimeError("is_cancelled() on an answered request")
        return self.client_gone


class Markers:
    def __init__(self):
        self.marked: set[str] = set()
        self.sweeps = 0

    def take(self, request_id: str) -> bool:
        if request_id in self.marked:
            self.marked.discard(request_id)
            return True
        return False

    def sweep(self) -> None:
        self.sweeps += 1


class Engine:
    """Holds each submission's completion; `finish` calls it, as the engine's thread does."""

    def __init__(self, answer_on_cancel: bool = True, refuse: bool = False):
        self.pending: dict[int, object] = {}
        self.cancelled: list[int] = []
        self.answer_on_cancel = answer_on_cancel
        self.refuse = refuse
        self.next_handle = 0

    def submit(self, items, on_done):
        if self.refuse:  # as GeneratorService does with no replica serving: answered inline, no handle
            on_done(RuntimeError("the generator engine is restarting; retry shortly"))
            return None
        self.next_handle += 1
        self.pending[self.next_handle] = on_done
        return self.next_handle

    def finish(self, handle: int, outcome) -> None:
        self.pending.pop(handle)(outcome)

    def cancel(self, handle: int) -> None:
        self.cancelled.append(handle)
        if self.answer_on_cancel and handle in self.pending:
            self.finish(handle, RuntimeError("aborted"))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(engine: Engine, send=None):
    sent: list[tuple[str, object]] = []
    lock = threading.Lock()

    def record(sender, outcome):
        with lock:
            sent.append((sender, outcome))
        if send is not None:
            send(sender, outcome)

    clock = Clock()
    markers = Markers()
    in_flight = InFlight(engine, record, markers, clock=clock)
    return in_flight, sent, clock, markers


def drain(in_flight: InFlight, expected: int, sent: list) -> None:
    """Run the sender until `expected` responses went out (bounded by work, not time: the
    queue holds them already)."""
    in_flight.responses.put((None, None))
    in_flight._send_loop()
    assert len(sent) == expected


def test_each_request_is_answered_once_with_its_own_outcome():
    engine = Engine()
    in_flight, sent, _, _ = make(engine)
    requests = [Request(f"r{i}") for i in range(5)]
    for i, request in enumerate(requests):
        in_flight.submit(request, f"sender{i}", ["item"])
    assert len(in_flight) == 5
    for handle in [3, 1, 5, 2, 4]:
        engine.finish(handle, [f"answer{handle}"])
    assert len(in_flight) == 0
    drain(in_flight, 5, sent)
    assert sorted(sent) == [(f"sender{i}", [f"answer{i + 1}"]) for i in range(5)]


def test_a_refusal_inline_is_answered_once_and_leaves_nothing_in_flight():
    engine = Engine(refuse=True)
    in_flight, sent, _, _ = make(engine)
    in_flight.submit(Request("r"), "sender", ["item"])
    assert len(in_flight) == 0
    drain(in_flight, 1, sent)
    assert isinstance(sent[0][1], RuntimeError)


def test_unreadable_input_is_answered_through_the_same_queue():
    in_flight, sent, _, _ = make(Engine())
    in_flight.answer("sender", ValueError("bad tensor"))
    drain(in_flight, 1, sent)
    assert sent[0][0] == "sender" and str(sent[0][1]) == "bad tensor"


def test_a_marked_request_is_aborted_once_it_is_old_enough():
    engine = Engine(answer_on_cancel=False)
    in_flight, _, clock, markers = make(engine)
    young, old, gone = Request("young"), Request("old"), Request("grpc")
    in_flight.submit(old, "s-old", ["x"])
    in_flight.submit(gone, "s-grpc", ["x"])
    clock.now += InFlight.min_age_s + 0.1
    in_flight.submit(young, "s-young", ["x"])
    markers.marked |= {"old", "young"}
    gone.client_gone = True
    assert in_flight.abort_cancelled() == 2
    assert sorted(engine.cancelled) == [1, 2]
    assert "young" in markers.marked  # not taken: too young to be asked about
    clock.now += InFlight.min_age_s
    assert in_flight.abort_cancelled() == 2  # young now; old and grpc are asked again (not yet answered)
    assert 3 in engine.cancelled


def test_an_answered_request_is_never_asked_whether_it_was_cancelled():
    engine = Engine()
    in_flight, _, clock, _ = make(engine)
    request = Request("r")
    in_flight.submit(request, "s", ["x"])
    engine.finish(1, ["answer"])
    request.answered = True
    request.client_gone = True
    clock.now += 10
    assert in_flight.abort_cancelled() == 0  # is_cancelled() would raise if asked


def test_close_aborts_what_generates_and_waits_until_it_is_answered():
    engine = Engine(answer_on_cancel=True)
    in_flight, sent, _, _ = make(engine)
    in_flight.start()
    for i in range(3):
        in_flight.submit(Request(f"r{i}"), f"s{i}", ["x"])
    assert in_flight.close(timeout_s=5) == 0
    assert sorted(engine.cancelled) == [1, 2, 3]
    in_flight.sender.join(5)
    assert not in_flight.sender.is_alive() and len(sent) == 3


def test_close_is_bounded_when_the_engine_never_answers():
    engine = Engine(answer_on_cancel=False)
    in_flight, _, _, _ = make(engine)
    in_flight.start()
    in_flight.submit(Request("stuck"), "s", ["x"])
    began = time.monotonic()
    assert in_flight.close(timeout_s=0.2) == 1
    assert time.monotonic() - began < 30  # bounded; the bound is close's own, not this test's


def test_a_sender_that_raises_does_not_stop_the_others():
    def send(sender, outcome):
        if sender == "gone":
            raise RuntimeError("Unable to send the response: the client is gone")

    engine = Engine()
    in_flight, sent, _, _ = make(engine, send)
    in_flight.submit(Request("a"), "gone", ["x"])
    in_flight.submit(Request("b"), "fine", ["x"])
    engine.finish(1, ["one"])
    engine.finish(2, ["two"])
    drain(in_flight, 2, sent)
    assert [s for s, _ in sent] == ["gone", "fine"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "finish", "mark", "poll", "tick"]), st.integers(0, 7)),
                max_size=40))
def test_any_interleaving_answers_every_request_exactly_once(steps):
    """Submissions, completions, client disconnects and polls in any order, then close:
    every submitted request got exactly one response, none was asked about after its answer."""
    engine = Engine(answer_on_cancel=True)
    in_flight, sent, clock, markers = make(engine)
    requests: list[Request] = []
    for action, n in steps:
        if action == "submit":
            request = Request(f"r{len(requests)}")
            requests.append(request)
            in_flight.submit(request, request.id, ["x"])
        elif action == "finish" and engine.pending:
            handle = sorted(engine.pending)[n % len(engine.pending)]
            requests[handle - 1].answered = True
            engine.finish(handle, ["answer"])
        elif action == "mark" and requests:
            markers.marked.add(requests[n % len(requests)].id)
        elif action == "poll":
            in_flight.abort_cancelled()
            for handle in engine.cancelled:
                requests[handle - 1].answered = True
        elif action == "tick":
            clock.now += n * 0.3
    left = in_flight.close(timeout_s=0)
    assert left == 0
    drain(in_flight, len(requests), sent)
    assert sorted(s for s, _ in sent) == sorted(r.id for r in requests)
