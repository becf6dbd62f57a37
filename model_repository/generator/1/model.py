"""Triton adapter of the generator: vLLM (or transformers) behind dynamic batching.

`execute` hands each request to the engine and returns None at once; the request is
answered later through its response sender. Three threads, on purpose:
- the stub's main thread runs `execute`, so new requests keep arriving and joining
  vLLM's running batch while earlier ones generate;
- the engine's own asyncio thread (in preprocess.engine.vllm_runner) keeps vLLM stepping;
- the response thread below serializes and sends responses, so vLLM never waits on it.
"""
import os
import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process, python_executable

log = prepare_stub_process("generator")

from preprocess import triton_io as io  # noqa: E402
from preprocess.engine.generation import classify_error, generation_items  # noqa: E402
from preprocess.engine.service import GeneratorService, prepare_generator_process  # noqa: E402
from preprocess.engine.metrics import GeneratorMetrics  # noqa: E402
from preprocess.engine.orphan_guard import start_guard  # noqa: E402
from preprocess.engine.stream_socket import StreamServer, socket_path  # noqa: E402
from preprocess.errors import ErrorKind  # noqa: E402
from preprocess.runtime import CancelMarkers  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(exc, engine_healthy=True):
    """Bad input keeps its message; an internal error is logged here and the client gets no
    class names or internals."""
    kind = classify_error(exc, engine_healthy)
    if kind is ErrorKind.INTERNAL:
        log.error("internal error answering a request: %s: %s", type(exc).__name__, exc)
        message = "internal error in the generator (see the server log)"
    elif kind is ErrorKind.UNAVAILABLE:
        message = f"the generator engine is unavailable or restarting; retry shortly ({exc})"
    else:
        message = str(exc)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError,
                                                                                  kind.triton_code)))


def read_items(request):
    def tensor(name):
        found = pb_utils.get_input_tensor_by_name(request, name)
        return None if found is None else found.as_numpy()

    return generation_items(*io.generator_columns(tensor))


class TritonPythonModel:
    def initialize(self, args):
        settings = prepare_generator_process(os.environ)
        # Ends this stub's engine processes if the stub dies without shutting them down.
        self.orphan_guard = start_guard(os.getpid(), python_executable())
        runtime = settings.runtime_dir  # set by `./build.sh serve`; the shim reads the state there
        self.metrics = GeneratorMetrics(pb_utils)  # the service adds a figure set per replica
        self.service = GeneratorService(settings, self.metrics, process_environ=os.environ)
        self.responses = queue.Queue()
        self.sender = threading.Thread(target=self._send_responses, name="response-sender", daemon=True)
        self.sender.start()
        # Requests still generating, watched for cancellation (client gone): abort them in vLLM.
        self.in_flight = {}
        self.cancel_markers = CancelMarkers(runtime / "cancelled" if runtime else None)
        self.in_flight_lock = threading.Lock()
        self.stopping = threading.Event()
        self.watcher = threading.Thread(target=self._watch_cancellations, name="cancel-watcher", daemon=True)
        self.watcher.start()
        # Token streaming for the decoupled `generator_stream` model (see stream_socket.py).
        self.stream_server = StreamServer(self.service, socket_path(runtime), classify_error)
        self.stream_server.start()
        log.info("ready: %s", self.service.info())

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                items = read_items(request)
            except Exception as exc:  # this request only; the others of the batch go on
                sender.send(error_response(exc), flags=FINAL)
                continue
            key = object()
            with self.in_flight_lock:
                self.in_flight[key] = (request, None, time.monotonic())

            def done(outcome, sender=sender, key=key):
                # Runs on the engine thread: only enqueue, the response thread does the sending.
                with self.in_flight_lock:
                    self.in_flight.pop(key, None)
                self.responses.put((sender, outcome))

            handle = self.service.submit(items, done)
            with self.in_flight_lock:
                if key in self.in_flight:
                    self.in_flight[key] = (request, handle, self.in_flight[key][2])
        return None

    def _watch_cancellations(self):
        """Abort requests whose client is gone. gRPC clients cancel through Triton
        (request.is_cancelled()); Triton 2.51's HTTP frontend does not propagate a
        disconnect, so the shim drops a marker named after the request id instead.
        is_cancelled() is asked under the lock: an entry still in the map has not been
        answered, and asking about an answered request crashes tritonserver (measured)."""
        sweeps = 0
        while not self.stopping.wait(0.5):
            sweeps += 1
            if sweeps % 20 == 0:  # every 10 s: markers of requests answered before the mark
                self.cancel_markers.sweep()
            now = time.monotonic()
            to_cancel = []
            with self.in_flight_lock:
                for request, handle, started in self.in_flight.values():
                    if handle is None or now - started < 1.0:
                        continue
                    if self.cancel_markers.take(request.request_id()) or request.is_cancelled():
                        to_cancel.append((request.request_id(), handle))
            for request_id, handle in to_cancel:
                log.info("request %s cancelled by the client; aborting %s", request_id, handle.batch_id)
                self.service.cancel(handle)

    def _send_responses(self):
        while True:
            sender, outcome = self.responses.get()
            if sender is None:
                return
            try:
                if isinstance(outcome, BaseException):
                    sender.send(error_response(outcome, self.service.serving), flags=FINAL)
                    continue
                outputs = io.generator_outputs(
                    [r.text for r in outcome], [r.prompt_tokens for r in outcome],
                    [r.completion_tokens for r in outcome], [r.finish_reason for r in outcome],
                    [r.logprobs_json() for r in outcome])
                tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
            except Exception as exc:  # a client that went away must not stop the sender
                log.warning("could not send a response: %s", exc)

    def finalize(self):
        """Abort what is still generating and answer it, within a bounded time, before the
        engine goes: a response sender outliving the stub's shutdown crashes the stub."""
        self.stopping.set()
        self.stream_server.stop()
        with self.in_flight_lock:
            pending = [handle for _, handle, _ in self.in_flight.values() if handle is not None]
        for handle in pending:
            self.service.cancel(handle)
        deadline = time.monotonic() + 10
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.responses.put((None, None))
        self.sender.join(5)
        self.service.shutdown(timeout_s=10)
        self.metrics.close()
