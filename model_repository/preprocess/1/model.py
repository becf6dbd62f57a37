"""Triton adapter of the preprocess stage: routing, chat formatting, token ids."""
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from preprocess.stub import prepare_stub_process

log = prepare_stub_process("preprocess")

from preprocess import triton_io as io  # noqa: E402
from preprocess.contract import (GENERATOR_SCALARS, GENERATOR_TEXTS, NUMPY_TYPES, REASONING_MODE, SAMPLING,  # noqa: E402
                                 InvalidRequest)
from preprocess.preprocess_stage import PreprocessStage, RequestRows  # noqa: E402
from preprocess.settings import load  # noqa: E402
from preprocess.tokenizer import load_tokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = load(os.environ)
        self.stage = PreprocessStage(settings, load_tokenizer(settings.model_dir))
        log.info("ready: model %s, fast chat template %s", settings.model_dir, self.stage.formatter.fast)

    def execute(self, requests):
        return io.answer_each_statelessly(pb_utils, requests, self._one, "preprocess", log)

    def _one(self, request):
        optional = io.input_reader(pb_utils, request)
        prompts, messages = optional("prompt"), optional("messages")
        if prompts is None and messages is None:
            raise InvalidRequest("the request needs `prompt` or `messages`")
        count = len((prompts if prompts is not None else messages).reshape(-1))

        def texts(name):
            values = optional(name)
            return None if values is None else io.column(io.decode_strings(values, name), count)

        def values(name):
            return io.column(optional(name), count)

        rows = self.stage.prepare(RequestRows(
            prompts=texts("prompt") or [None] * count,
            messages=texts("messages"),
            system_prompts=texts("system_prompt"),
            overrides={s.name: values(s.name) for s in SAMPLING},
            ignore_eos=values("ignore_eos"), raw=values("raw"), verbatim=values("verbatim"),
            seed=values("seed"), top_logprobs=values("top_logprobs"),
            stop=texts("stop"), response_format=texts("response_format"),
            split_reasoning=values("split_reasoning"),
        ))
        s = [row.sampling for row in rows]
        outputs = {name: io.scalars([getattr(x, field) for x in s], NUMPY_TYPES[dtype])
                   for name, dtype, field in GENERATOR_SCALARS}
        outputs.update({name: io.encode_strings([x.tensor_text(field) for x in s]) for name, field in GENERATOR_TEXTS})
        outputs.update({
            "PROMPT_IDS": io.pad_token_ids([row.token_ids for row in rows]),
            "ROUTE": io.encode_strings([row.decision.route.value for row in rows]),
            "IS_CODE": io.scalars([row.decision.is_code for row in rows], np.bool_),
            "PROMPT_TEXT": io.encode_strings([row.text for row in rows]),
            REASONING_MODE[0]: io.scalars([int(row.reasoning) for row in rows], NUMPY_TYPES[REASONING_MODE[1]]),
        })
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
