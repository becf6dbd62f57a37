"""The one contract table: the config.pbtxt files agree with it, and its ranges hold at the bounds."""
from __future__ import annotations

import re

import pytest

from preprocess.contract import (GENERATOR_SCALARS, GENERATOR_TEXTS, MAX_BATCH_SIZE, OPTIONAL_OUTPUTS, OUTPUTS,
                                 SETTINGS, STREAM_ENSEMBLE, STREAM_OUTPUTS, TEXT_INPUTS, OutOfRange)
from tests.conftest import REPO

CONFIGS = REPO / "model_repository"


def tensors(model: str, section: str) -> dict[str, str]:
    text = (CONFIGS / model / "config.pbtxt").read_text()
    block = re.search(rf"^{section} \[(.*?)^\]", text, re.S | re.M).group(1)
    return dict(re.findall(r'name: "(\w+)", data_type: TYPE_(\w+)', block))


def max_batch_size(model: str) -> int:
    return int(re.search(r"^max_batch_size: (\d+)", (CONFIGS / model / "config.pbtxt").read_text(), re.M).group(1))


def test_ensemble_and_preprocess_inputs_are_the_table():
    expected = {**{name: "STRING" for name in TEXT_INPUTS},
                **{s.name: s.triton_type for s in SETTINGS.values()}}
    assert tensors("llm", "input") == expected
    assert tensors("preprocess", "input") == expected


def test_generator_inputs_and_preprocess_outputs_are_the_table():
    scalars = {name: dtype for name, dtype, _ in GENERATOR_SCALARS}
    scalars.update({name: "STRING" for name, _ in GENERATOR_TEXTS})
    generator = tensors("generator", "input")
    assert generator.pop("PROMPT_IDS") == "INT32" and generator == scalars
    assert scalars.items() <= tensors("preprocess", "output").items()
    assert list(tensors("llm", "output")) == [*OUTPUTS, *OPTIONAL_OUTPUTS]


def test_the_streaming_pair_takes_what_the_batch_pair_takes():
    """llm_stream has llm's inputs and generator_stream the generator's: one contract."""
    assert tensors(STREAM_ENSEMBLE, "input") == tensors("llm", "input")
    assert tensors("generator_stream", "input") == tensors("generator", "input")
    assert list(tensors(STREAM_ENSEMBLE, "output")) == list(STREAM_OUTPUTS)
    # generator_stream: the generator's outputs, the piece's TOKEN_IDS, and ERROR, the kind of a failed stream
    assert list(tensors("generator_stream", "output")) == [*tensors("generator", "output"), "TOKEN_IDS", "ERROR"]
    from preprocess.triton_io import generator_outputs, stream_outputs

    streamed = stream_outputs({"text": "a", "prompt_tokens": 1, "tokens": 2, "finish_reason": None}, "")
    assert list(streamed) == list(tensors("generator_stream", "output"))
    assert streamed["TOKEN_IDS"].shape == (1, 0)  # a piece without ids (an error's) sends none
    with_ids = stream_outputs({"text": "a", "prompt_tokens": 1, "tokens": 2, "token_ids": [7, 8]}, "")
    assert with_ids["TOKEN_IDS"].tolist() == [[7, 8]] and str(with_ids["TOKEN_IDS"].dtype) == "int32"
    assert [name.lower() for name in streamed] == list(STREAM_OUTPUTS)

    written = generator_outputs(["a"], [1], [2], ["stop"], [""])  # what both adapters send
    assert {name: str(array.dtype) for name, array in written.items()} == {
        "TEXT": "object", "PROMPT_TOKENS": "int32", "COMPLETION_TOKENS": "int32", "FINISH_REASON": "object",
        "LOGPROBS": "object"}
    assert list(written) == list(tensors("generator", "output"))
    text = (CONFIGS / "generator_stream" / "config.pbtxt").read_text()
    assert "decoupled: true" in text and max_batch_size("generator_stream") == max_batch_size(STREAM_ENSEMBLE) == 1


def test_every_model_batches_the_same_rows():
    assert {max_batch_size(m) for m in ("llm", "preprocess", "generator", "postprocess")} == {MAX_BATCH_SIZE}


# The bounds below are vLLM's own SamplingParams checks (temperature [0, 2], top_p (0, 1],
# penalties [-2, 2]), except repetition_penalty <= 2 and top_k != 0: the replaced service's.
@pytest.mark.parametrize("name, inside, outside", [
    ("temperature", [0, 2, 1e-9], [-1e-9, 2.000001, float("nan"), float("inf")]),
    ("top_p", [1, 1e-9], [0, 1.0000001, -0.5]),
    ("top_k", [-1, 1, 2**31 - 1], [0, -2, 2**31, 1.5]),
    ("repetition_penalty", [2, 1e-9], [0, 2.0000001]),
    ("frequency_penalty", [-2, 2], [-2.0000001, 2.0000001]),
    ("presence_penalty", [-2, 2], [-2.0000001, 2.0000001]),
    ("seed", [0, 2**63 - 1], [-1, 2**63, 0.5]),  # exact at 2**63 - 1: no float rounding
    ("top_logprobs", [0, 20], [-1, 21]),
    ("max_new_tokens", [1, 4096], [0, 4097]),
    ("ignore_eos", [True, False], ["yes", 1]),
])
def test_ranges_hold_just_inside_and_just_outside(name, inside, outside):
    for value in inside:
        SETTINGS[name].check(value)
    for value in outside:
        with pytest.raises(OutOfRange, match=name):
            SETTINGS[name].check(value)


def test_the_message_names_the_range():
    with pytest.raises(OutOfRange, match=r"^temperature must be in \[0, 2\], got 2.5$"):
        SETTINGS["temperature"].check(2.5)
    with pytest.raises(OutOfRange, match=r"^top_k must be in -1 or \[1, 2147483647\], got 0$"):
        SETTINGS["top_k"].check(0)
