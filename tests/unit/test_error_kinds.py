"""One error vocabulary (preprocess.errors): each kind's status and Triton code, and a status
that survives a channel carrying text only."""
from __future__ import annotations

from hypothesis import given, strategies as st

from preprocess.errors import ErrorKind, read_tag


def test_each_kind_has_its_status_and_triton_code():
    assert [(k.value, k.status, k.triton_code) for k in ErrorKind] == [
        ("invalid", 400, "INVALID_ARG"), ("unavailable", 503, "UNAVAILABLE"), ("internal", 500, "INTERNAL")]


@given(st.sampled_from(list(ErrorKind)), st.text())
def test_a_tagged_message_gives_back_its_status_and_its_text(kind, message):
    assert read_tag(kind.tagged(message)) == (kind.status, message)


def test_an_untagged_message_has_no_status():
    assert read_tag("plain [4000] words") == (None, "plain [4000] words")
    # Triton may put its own words in front of the model's message.
    assert read_tag("in ensemble 'llm_stream', [400] bad") == (400, "in ensemble 'llm_stream', bad")
