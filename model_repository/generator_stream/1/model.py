"""Triton adapter of generator_stream: one answer, sent piece by piece (decoupled).

It holds no engine. `execute` starts one thread per request and returns at once: a
stream lasts as long as its generation, and Triton must go on handing over new requests
meanwhile. Each thread relays its request to the generator's engines over a local socket
(preprocess/engine/stream_socket.py) and sends every piece as a response, the last one
with the FINAL flag. A cancelled request ends the relay, and closing the socket aborts
the generation in vLLM. Cancelled means the shim's cancel marker, or Triton's own flag,
which a direct call to this model gets but a call through llm_stream does not (Triton
2.51's ensemble checks for cancellation only between steps).
"""
import os
import threading

import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process

log = prepare_stub_process("generator_stream")

from preprocess import triton_io as io  # noqa: E402
from preprocess.contract import STREAM_FAILED, InvalidRequest  # noqa: E402
from preprocess.engine.generation import logprobs_json  # noqa: E402
from preprocess.errors import ErrorKind  # noqa: E402
from preprocess.engine.stream_socket import StreamFailed, socket_path, stream_events  # noqa: E402
from preprocess.runtime import CancelMarkers, Rarely  # noqa: E402
from preprocess.settings import load  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
MAX_STREAMS = 256  # relays at once; more get UNAVAILABLE rather than a thread each
# How often a relay asks whether its request was cancelled: each ask is a round trip to
# tritonserver: asked for every piece, it held up every stream under load.
CANCEL_CHECK_S = 0.1


def tensors_response(outputs):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()])


def error_response(message, kind):
    # A decoupled model's Triton error would reach a gRPC client as its text alone: a failed
    # stream ends in band, its kind in ERROR (contract.STREAM_OUTPUTS).
    piece = {"text": message, "prompt_tokens": 0, "tokens": 0, "finish_reason": STREAM_FAILED}
    return tensors_response(io.stream_outputs(piece, "", kind))


def piece_response(piece):
    return tensors_response(io.stream_outputs(piece, logprobs_json(piece.get("logprobs"))))


class TritonPythonModel:
    def initialize(self, args):
        runtime = load(os.environ).runtime_dir
        self.path = socket_path(runtime)
        self.cancel_markers = CancelMarkers(runtime / "cancelled" if runtime else None)
        self.slots = threading.BoundedSemaphore(MAX_STREAMS)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            if not self.slots.acquire(blocking=False):
                sender.send(error_response(f"more than {MAX_STREAMS} streams at once; retry shortly",
                                           ErrorKind.UNAVAILABLE), flags=FINAL)
                continue
            threading.Thread(target=self._relay, args=(request, sender), name="stream-relay", daemon=True).start()
        return None

    def _relay(self, request, sender):
        """Send every piece, then FINAL exactly once. is_cancelled() is only asked before
        the final response: asking after it crashes tritonserver (measured on 2.51)."""
        try:
            prompt_ids, values = self._read(request)
            request_id = request.request_id()

            cancelled = Rarely(lambda: request.is_cancelled() or self.cancel_markers.take(request_id), CANCEL_CHECK_S)

            for piece in stream_events(self.path, prompt_ids, values, cancelled):
                last = piece.get("finish_reason") is not None
                if not last and cancelled():
                    break
                sender.send(piece_response(piece), flags=FINAL if last else 0)
                if last:
                    return
            log.info("request %s cancelled by the client; stream aborted", request_id)
            sender.send(error_response("the request was cancelled", ErrorKind.UNAVAILABLE), flags=FINAL)
        except InvalidRequest as exc:
            sender.send(error_response(str(exc), ErrorKind.INVALID), flags=FINAL)
        except StreamFailed as exc:
            if exc.kind is ErrorKind.INTERNAL:
                log.error("stream failed: %s", exc)
            sender.send(error_response(str(exc), exc.kind), flags=FINAL)
        except Exception as exc:  # a bug: logged here, the client gets no internals
            log.error("internal error streaming a request: %s: %s", type(exc).__name__, exc)
            sender.send(error_response("internal error in generator_stream (see the server log)", ErrorKind.INTERNAL),
                        flags=FINAL)
        finally:
            self.slots.release()

    @staticmethod
    def _read(request):
        prompts, columns = io.generator_columns(io.input_reader(pb_utils, request))
        if len(prompts) != 1:
            raise InvalidRequest(f"generator_stream takes one prompt per request, got {len(prompts)}")
        return prompts[0], {field: values[0] for field, values in columns.items()}
