"""Triton adapter of the preprocess stage: routing, chat formatting, token ids."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process

log = prepare_stub_process("preprocess")

from preprocess import triton_io as io  # noqa: E402
from preprocess.pipeline import PreprocessStage, load_tokenizer  # noqa: E402
from preprocess.sampling import InvalidRequest  # noqa: E402
from preprocess.settings import resolve_model_dir  # noqa: E402

OVERRIDES = {  # ensemble input -> override name
    "max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
    "top_k": "top_k", "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_penalty",
}


def optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        model_dir = resolve_model_dir(os.environ)
        self.stage = PreprocessStage(os.environ, load_tokenizer(model_dir))
        log.info("ready: model %s, fast chat template %s", model_dir, self.stage.formatter.fast)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            questions = io.decode_strings(optional(request, "prompt"), "prompt")
            count = len(questions)
            systems = optional(request, "system_prompt")
            rows = self.stage.run(
                questions,
                system_prompts=None if systems is None else io.column(io.decode_strings(systems, "system_prompt"), count),
                overrides={name: io.column(optional(request, tensor), count) for tensor, name in OVERRIDES.items()},
                ignore_eos=io.column(optional(request, "ignore_eos"), count),
                raw=io.column(optional(request, "raw"), count),
            )
        except (InvalidRequest, ValueError) as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
        s = [row.sampling for row in rows]
        outputs = {
            "PROMPT_IDS": io.pad_token_ids([row.token_ids for row in rows]),
            "MAX_TOKENS": io.scalars([x.max_tokens for x in s], np.int32),
            "TEMPERATURE": io.scalars([x.temperature for x in s], np.float32),
            "TOP_P": io.scalars([x.top_p for x in s], np.float32),
            "TOP_K": io.scalars([x.top_k for x in s], np.int32),
            "REPETITION_PENALTY": io.scalars([x.repetition_penalty for x in s], np.float32),
            "FREQUENCY_PENALTY": io.scalars([x.frequency_penalty for x in s], np.float32),
            "IGNORE_EOS": io.scalars([x.ignore_eos for x in s], np.bool_),
            "ROUTE": io.encode_strings([row.decision.route.value for row in rows]),
            "IS_CODE": io.scalars([row.decision.is_code for row in rows], np.bool_),
            "PROMPT_TEXT": io.encode_strings([row.text for row in rows]),
        }
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
