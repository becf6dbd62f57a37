"""Triton adapter of the generator: vLLM (or transformers) behind dynamic batching.

`execute` hands each request to the engine and returns None at once; the request is
answered later through its response sender. Which thread does what, and the guarantees
(each request answered exactly once, aborted when its client goes, drained at finalize),
live in preprocess.engine.inflight, where they are tested without Triton.
"""
import os

import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process, python_executable

log = prepare_stub_process("generator")

from preprocess import triton_io as io  # noqa: E402
from preprocess.engine.generation import client_error, generation_items  # noqa: E402
from preprocess.engine.inflight import InFlight  # noqa: E402
from preprocess.engine.service import GeneratorService, prepare_generator_process  # noqa: E402
from preprocess.engine.metrics import GeneratorMetrics  # noqa: E402
from preprocess.engine.orphan_guard import start_guard  # noqa: E402
from preprocess.engine.stream_socket import StreamServer, socket_path  # noqa: E402
from preprocess.runtime import CancelMarkers  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def error_response(exc, engine_healthy=True):
    return io.error_response(pb_utils, *client_error(exc, engine_healthy))


def read_items(request):
    return generation_items(*io.generator_columns(io.input_reader(pb_utils, request)))


class TritonPythonModel:
    def initialize(self, args):
        settings = prepare_generator_process(os.environ)
        # Ends this stub's engine processes if the stub dies without shutting them down.
        self.orphan_guard = start_guard(os.getpid(), python_executable())
        runtime = settings.runtime_dir  # set by `./build.sh serve`; the shim reads the state there
        self.metrics = GeneratorMetrics(pb_utils)  # the service adds a figure set per replica
        self.service = GeneratorService(settings, self.metrics, process_environ=os.environ)
        markers = CancelMarkers(runtime / "cancelled" if runtime else None)
        self.in_flight = InFlight(self.service, self._send, markers)
        self.in_flight.start()
        # Token streaming for the decoupled `generator_stream` model (see stream_socket.py).
        self.stream_server = StreamServer(self.service, socket_path(runtime), client_error)
        self.stream_server.start()
        log.info("ready: %s", self.service.info())

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                items = read_items(request)
            except Exception as exc:  # this request only; the others of the batch go on
                self.in_flight.answer(sender, exc)
                continue
            self.in_flight.submit(request, sender, items)
        return None

    def _send(self, sender, outcome):
        """On the response thread: one final response per request."""
        if isinstance(outcome, BaseException):
            sender.send(error_response(outcome, self.service.serving), flags=FINAL)
            return
        outputs = io.generator_outputs(
            [r.text for r in outcome], [r.prompt_tokens for r in outcome],
            [r.completion_tokens for r in outcome], [r.finish_reason for r in outcome],
            [r.logprobs_json() for r in outcome])
        tensors = [pb_utils.Tensor(name, array) for name, array in outputs.items()]
        sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)

    def finalize(self):
        """Abort what is still generating and answer it, bounded, before the engine goes."""
        self.stream_server.stop()
        self.in_flight.close(timeout_s=10)
        self.service.shutdown(timeout_s=10)
        self.metrics.close()
