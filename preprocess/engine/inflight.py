"""The generator's request bookkeeping, free of Triton: what is in flight, who answers it, when
it is aborted. The Triton adapter (model_repository/generator/1/model.py) only reads tensors,
calls `InFlight.submit` and turns outcomes into responses.

Threads, and why each exists:
- Triton's thread calls `submit` and returns at once, so new requests keep joining vLLM's
  running batch while earlier ones generate;
- the engine's thread (vllm_runner / process_runner) calls each request's completion; it only
  enqueues, so vLLM never waits on a response being serialized or sent;
- `response-sender` takes the queue and sends, one response per request, each exactly once;
- `cancel-watcher` asks every 0.5 s whether a client is gone and aborts its request in vLLM.

Guarantees: every submitted request gets exactly one `send` (its outcome, or the error that
ended it); a `send` that raises never stops the sender; `close` aborts what still generates
and waits, bounded, until each is answered, because a response sender that outlives the
stub's shutdown crashes the stub.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Protocol, Sequence

log = logging.getLogger("generator")


class Request(Protocol):
    """What the bookkeeping needs of a Triton request."""

    def request_id(self) -> str: ...

    def is_cancelled(self) -> bool: ...


class Markers(Protocol):
    """runtime.CancelMarkers: the shim's disconnect markers, by request id."""

    def take(self, request_id: str) -> bool: ...

    def sweep(self) -> None: ...


class Service(Protocol):
    """What the bookkeeping needs of engine.service.GeneratorService."""

    def submit(self, items: Sequence[Any], on_done: Callable[[Any], None]) -> Any: ...

    def cancel(self, handle: Any) -> None: ...


# send(sender, outcome): outcome is the list of results, or the exception that ended the request.
Send = Callable[[Any, Any], None]


class InFlight:
    poll_s = 0.5
    min_age_s = 1.0  # younger requests are not asked about: most are answered before then
    sweep_every = 20  # polls between sweeps of markers nobody took (10 s)

    def __init__(self, service: Service, send: Send, markers: Markers, clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.send = send
        self.markers = markers
        self.clock = clock
        self.lock = threading.Lock()
        # key -> [request, engine handle or None until submitted, submitted at]
        self.entries: dict[object, list[Any]] = {}
        self.responses: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.sender = threading.Thread(target=self._send_loop, name="response-sender", daemon=True)
        self.watcher = threading.Thread(target=self._watch_loop, name="cancel-watcher", daemon=True)

    def start(self) -> None:
        self.sender.start()
        self.watcher.start()

    def __len__(self) -> int:
        with self.lock:
            return len(self.entries)

    def submit(self, request: Request, sender: Any, items: Sequence[Any]) -> None:
        """Hands `items` to the engine; `sender` gets exactly one outcome later."""
        key = object()
        with self.lock:
            self.entries[key] = [request, None, self.clock()]

        def done(outcome: Any) -> None:  # on the engine's thread: only enqueue
            with self.lock:
                self.entries.pop(key, None)
            self.responses.put((sender, outcome))

        try:
            handle = self.service.submit(items, done)
        except Exception as exc:  # the service refused before taking the request
            done(exc)
            return
        with self.lock:
            if key in self.entries:  # not answered already (a refusal answers inline)
                self.entries[key][1] = handle

    def answer(self, sender: Any, outcome: Any) -> None:
        """Answers a request that never reached the engine (unreadable input), in order with the rest."""
        self.responses.put((sender, outcome))

    def cancelled(self) -> list[tuple[str, Any]]:
        """One poll: (request id, handle) of each request older than `min_age_s` whose client
        is gone. gRPC clients cancel through Triton (is_cancelled); Triton 2.51's HTTP frontend
        does not pass a disconnect on, so the shim drops a marker named after the request id.
        is_cancelled() is asked under the lock: an entry still here has not been answered, and
        asking about an answered request crashes tritonserver (measured)."""
        now = self.clock()
        found = []
        with self.lock:
            for request, handle, started in self.entries.values():
                if handle is None or now - started < self.min_age_s:
                    continue
                request_id = request.request_id()
                if self.markers.take(request_id) or request.is_cancelled():
                    found.append((request_id, handle))
        return found

    def abort_cancelled(self) -> int:
        found = self.cancelled()
        for request_id, handle in found:
            self.service.cancel(handle)
            log.info("request %s cancelled by the client; aborted %s", request_id, getattr(handle, "batch_id", handle))
        return len(found)

    def _watch_loop(self) -> None:
        polls = 0
        while not self.stopping.wait(self.poll_s):
            polls += 1
            if polls % self.sweep_every == 0:
                self.markers.sweep()
            try:
                self.abort_cancelled()
            except Exception:  # a failed poll must not end the watching
                log.exception("cancel watcher: one poll failed")

    def _send_loop(self) -> None:
        while True:
            sender, outcome = self.responses.get()
            if sender is None:
                return
            try:
                self.send(sender, outcome)
            except Exception as exc:  # a client that went away must not stop the sender
                log.warning("could not send a response: %s", exc)

    def close(self, timeout_s: float = 10.0) -> int:
        """Aborts what still generates, waits up to `timeout_s` until each is answered, then
        stops both threads after the queue is sent. Returns how many were left unanswered."""
        self.stopping.set()
        with self.lock:
            pending = [handle for _, handle, _ in self.entries.values() if handle is not None]
        for handle in pending:
            self.service.cancel(handle)
        deadline = time.monotonic() + timeout_s
        while len(self) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self)
        self.responses.put((None, None))
        if self.sender.is_alive():
            self.sender.join(5)
        return left
