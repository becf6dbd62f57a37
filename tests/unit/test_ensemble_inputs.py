"""The shim's tensors: a value that does not fit its Triton type is refused, never wrapped."""
from __future__ import annotations

import pytest

from shim.ensemble import EnsembleError, build_inputs


def test_values_that_fit_become_tensors():
    inputs = build_inputs(["a", "b"], "sys", {"top_k": 2**31 - 1, "temperature": 0.5, "ignore_eos": True})
    assert [t.name() for t in inputs] == ["prompt", "system_prompt", "top_k", "temperature", "ignore_eos"]
    assert inputs[2].shape() == [2, 1]


@pytest.mark.parametrize("name, value", [("top_k", 2**32 - 1), ("max_new_tokens", 2**40), ("top_k", -2**31 - 1),
                                         ("temperature", 1e300), ("frequency_penalty", -1e39)])
def test_out_of_range_is_a_400_naming_the_field(name, value):
    with pytest.raises(EnsembleError) as caught:
        build_inputs(["a"], None, {name: value})
    assert caught.value.status == 400 and caught.value.message.startswith(f"{name}: ")
