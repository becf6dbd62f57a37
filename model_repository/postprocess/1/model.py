"""Triton adapter of the postprocess stage: answer clean-up."""
import os

import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process

log = prepare_stub_process("postprocess")

from preprocess import triton_io as io  # noqa: E402
from preprocess.contract import REASONING_MODE  # noqa: E402
from preprocess.postprocess_stage import PostprocessStage  # noqa: E402
from preprocess.settings import load  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.stage = PostprocessStage(load(os.environ))
        self.stage.prepare_reasoning()  # while the generator loads, not on the first chat

    def execute(self, requests):
        return io.answer_each_statelessly(pb_utils, requests, self._one, "postprocess", log)

    def _one(self, request):
        read = io.input_reader(pb_utils, request)
        modes = read(REASONING_MODE[0])  # optional: absent drops thinking
        answers, thoughts = self.stage.run(io.decode_strings(read("TEXT"), "TEXT"),
                                           io.decode_strings(read("ROUTE"), "ROUTE"),
                                           read("IS_CODE").reshape(-1).tolist(),
                                           None if modes is None else modes.reshape(-1).tolist())
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("answer", io.encode_strings(answers)),
                                                          pb_utils.Tensor("reasoning", io.encode_strings(thoughts))])
