"""One error vocabulary (preprocess.errors): each kind's status and Triton code; a failed
stream's kind travels in its own tensor, and the shim reads a status from Triton's code or
that tensor, never from a message's text."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st
from tritonclient.utils import InferenceServerException

from preprocess.contract import STREAM_FAILED
from preprocess.errors import ErrorKind
from preprocess.triton_io import stream_outputs
from shim.ensemble import EnsembleError, map_triton_error
from shim.streaming import read_piece

# What the shim answers for each kind: a bug in a model is a 502 from the shim's side.
SHIM_STATUS = {ErrorKind.INVALID: 400, ErrorKind.UNAVAILABLE: 503, ErrorKind.INTERNAL: 502}


def test_each_kind_has_its_status_and_triton_code():
    assert [(k.value, k.status, k.triton_code) for k in ErrorKind] == [
        ("invalid", 400, "INVALID_ARG"), ("unavailable", 503, "UNAVAILABLE"), ("internal", 500, "INTERNAL")]


class StreamResult:
    """llm_stream's response as tritonclient gives it: the ensemble's lower-case names."""

    def __init__(self, tensors):
        self.tensors = {name.lower(): array for name, array in tensors.items()}

    def as_numpy(self, name):
        return self.tensors[name]


@given(st.sampled_from(list(ErrorKind)), st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_a_failed_stream_names_its_kind_in_a_tensor_and_its_message_is_passed_on_as_written(kind, message):
    piece = {"text": message, "prompt_tokens": 0, "tokens": 0, "finish_reason": STREAM_FAILED}
    with pytest.raises(EnsembleError) as raised:
        read_piece(StreamResult(stream_outputs(piece, "", kind)))
    assert raised.value.status == SHIM_STATUS[kind]
    assert raised.value.message.endswith(message)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_a_piece_with_no_error_is_text_whatever_it_says(text):
    piece = {"text": text, "prompt_tokens": 3, "tokens": 1, "finish_reason": None}
    assert read_piece(StreamResult(stream_outputs(piece, ""))).text == text


@pytest.mark.parametrize("status, expected", [("400", 400), ("503", 503), ("StatusCode.UNAVAILABLE", 503),
                                              ("StatusCode.INVALID_ARGUMENT", 400), ("500", 502), (None, 502)])
@pytest.mark.parametrize("message", ["the generator engine is restarting; retry shortly", "[400] Unavailable"])
def test_a_triton_error_is_mapped_by_its_status_never_by_its_words(status, expected, message):
    assert map_triton_error(InferenceServerException(message, status=status)).status == expected
