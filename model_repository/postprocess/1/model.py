"""Triton adapter of the postprocess stage: answer clean-up."""
import os

import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process

log = prepare_stub_process("postprocess")

from preprocess import triton_io as io  # noqa: E402
from preprocess.pipeline import PostprocessStage  # noqa: E402
from preprocess.settings import load  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.stage = PostprocessStage(load(os.environ))

    def execute(self, requests):
        responses = []
        for request in requests:
            def read(name):
                return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

            try:
                answers = self.stage.run(
                    io.decode_strings(read("TEXT"), "TEXT"),
                    io.decode_strings(read("ROUTE"), "ROUTE"),
                    read("IS_CODE").reshape(-1).tolist(),
                )
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("answer", io.encode_strings(answers))]))
        return responses
