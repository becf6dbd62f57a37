"""The tensor helpers of the Triton adapters, without a server."""
from __future__ import annotations

import numpy as np
import pytest

from preprocess import triton_io as io
from preprocess.contract import PAD_ID, InvalidRequest


def test_strings_decode_per_row_and_bad_bytes_name_the_row():
    array = np.array([[b"ok"], ["\u4e2d".encode()], [b"\xff\xfe"]], dtype=np.object_)
    with pytest.raises(InvalidRequest, match=r"prompt\[2\] is not valid UTF-8"):
        io.decode_strings(array, "prompt")
    assert io.decode_strings(array[:2], "prompt") == ["ok", "中"]
    assert io.decode_strings(io.encode_strings(["a", "", "é"]), "x") == ["a", "", "é"]


def test_a_single_value_applies_to_every_row_and_a_mismatch_is_refused():
    assert io.column(np.array([[3]]), 4) == [3, 3, 3, 3]
    assert io.column(None, 4) is None
    assert io.column(np.array([[1], [2]]), 2) == [1, 2]
    with pytest.raises(InvalidRequest, match="expected 3 values, got 2"):
        io.column(np.array([[1], [2]]), 3)


def test_pad_and_unpad_round_trip_rows_of_any_length():
    rows = [[5, 6, 7], [], [1], [0, 0, 0, 0]]  # token id 0 is a real id; only PAD_ID pads
    padded = io.pad_token_ids(rows)
    assert padded.shape == (4, 4) and padded.dtype == np.int32 and padded[1, 0] == PAD_ID
    assert io.unpad_token_ids(padded) == rows


def test_one_failing_request_does_not_fail_its_batch():
    def answer(request):
        if request == "bad input":
            raise InvalidRequest("prompt 0: top_p must be in (0, 1], got 0")
        if request == "bug":
            raise KeyError("PROMPT_IDS")
        return f"answer to {request}"

    responses = io.answer_each(["a", "bad input", "bug", "b"], answer,
                               invalid=lambda exc: f"400 {exc}", internal=lambda request, exc: f"500 {request}")
    assert responses == ["answer to a", "400 prompt 0: top_p must be in (0, 1], got 0", "500 bug", "answer to b"]


def test_every_adapter_answers_an_error_kind_with_its_triton_code():
    """io.error_response: the one place an ErrorKind becomes Triton's error (all four adapters)."""
    from types import SimpleNamespace

    from preprocess.errors import ErrorKind

    class TritonError:
        INVALID_ARG, UNAVAILABLE, INTERNAL = "code-invalid", "code-unavailable", "code-internal"

        def __init__(self, message, code):
            self.message, self.code = message, code

    pb_utils = SimpleNamespace(TritonError=TritonError, InferenceResponse=lambda error: error)
    for kind, code in ((ErrorKind.INVALID, "code-invalid"), (ErrorKind.UNAVAILABLE, "code-unavailable"),
                       (ErrorKind.INTERNAL, "code-internal")):
        error = io.error_response(pb_utils, kind, "why")
        assert (error.message, error.code) == ("why", code)


def test_an_absent_optional_input_reads_as_none():
    from types import SimpleNamespace

    present = np.array([[1]], dtype=np.int32)
    tensors = {"SEED": SimpleNamespace(as_numpy=lambda: present)}
    pb_utils = SimpleNamespace(get_input_tensor_by_name=lambda request, name: tensors.get(name))
    read = io.input_reader(pb_utils, object())
    assert read("SEED") is present and read("TOP_LOGPROBS") is None
