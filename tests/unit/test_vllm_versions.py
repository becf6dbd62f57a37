"""The supported vLLM range: parsing what vLLM builds call themselves, and its two ends."""
import pytest
from hypothesis import given, strategies as st

from preprocess.engine.versions import SUPPORTED_VLLM, UnsupportedVllm, check_vllm_version, release, supported


@pytest.mark.parametrize("version, expected", [
    ("0.25.0", (0, 25, 0)), ("0.32.0+cpu", (0, 32, 0)), ("0.26.1.dev3+gabc123", (0, 26, 1)), ("1.0", (1, 0, 0)),
    ("0.33.0rc1", (0, 33, 0)), ("dev", None), ("", None),
])
def test_release_reads_vllm_version_strings(version, expected):
    assert release(version) == expected


@pytest.mark.parametrize("version, ok", [
    ("0.24.9", False), ("0.25.0", True), ("0.25.1", True), ("0.29.0+metax", True), ("0.32.0+cpu", True),
    ("0.32.9", True), ("0.33.0", False), ("0.8.5", False), ("1.0.0", False), ("unknown", False),
])
def test_the_range_and_its_ends(version, ok):
    assert supported(version) is ok


@given(st.tuples(st.integers(0, 3), st.integers(0, 60), st.integers(0, 20)))
def test_supported_means_inside_the_range(parts):
    text = ".".join(map(str, parts))
    assert supported(text) == (SUPPORTED_VLLM[0] <= parts < SUPPORTED_VLLM[1])
    if supported(text):
        assert check_vllm_version(text, allow_unsupported=False).startswith(f"vLLM {text} (supported")
    else:
        with pytest.raises(UnsupportedVllm, match="ALLOW_UNSUPPORTED_VLLM=1"):
            check_vllm_version(text, allow_unsupported=False)
        assert "starting anyway" in check_vllm_version(text, allow_unsupported=True)
