"""The generator's penalties give vLLM's logits bit for bit, against vLLM's own function.

Both sides get the same random logits, prompts, answers so far (with vLLM's -1 async
placeholders and rows that have seen nothing) and penalties; `torch.equal` on the
results, so one ulp apart fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
# Imported, not skipped when missing: a vLLM upgrade that moves it must fail the suite.
from vllm.v1.sample.ops import penalties as vllm_penalties

from preprocess.engine import penalties

pytestmark = pytest.mark.engine  # a real engine, twice

VOCAB = 50


def padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), width)


token_lists = st.lists(st.integers(0, VOCAB - 1), max_size=12)
penalty = st.sampled_from([0.0, 0.1, -0.5, 1.0, 1.05, 2.0, 0.5])
rows = st.lists(st.tuples(token_lists, st.lists(st.one_of(st.integers(0, VOCAB - 1), st.just(-1)), max_size=12),
                          penalty, penalty, st.sampled_from([1.0, 1.05, 1.3, 0.8])), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(rows, st.integers(0, 2**31 - 1))
def test_same_logits_as_vllm(batch, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(batch), VOCAB, generator=generator) * 4
    logits[:, ::7] = 0.0  # zeros sit on the branch between dividing and multiplying
    prompts = padded([prompt for prompt, *_ in batch], VOCAB)
    outputs = [list(output) for _, output, *_ in batch]
    presence = torch.tensor([p for *_, p, _, _ in batch], dtype=torch.float32)
    frequency = torch.tensor([f for *_, f, _ in batch], dtype=torch.float32)
    repetition = torch.tensor([r for *_, r in batch], dtype=torch.float32)

    expected = vllm_penalties.apply_all_penalties(logits.clone(), prompts, presence, frequency, repetition, outputs)
    got = penalties.apply_all_penalties(logits.clone(), prompts, presence, frequency, repetition, outputs)
    assert torch.equal(got, expected)


def test_a_row_that_has_seen_nothing_is_left_alone():
    logits = torch.randn(2, VOCAB)
    prompts = padded([[], [3, 3]], VOCAB)
    one = torch.ones(2)
    got = penalties.apply_all_penalties(logits.clone(), prompts, one, one, one * 2, [[-1], [4]])
    assert torch.equal(got[0], logits[0])
    assert not torch.equal(got[1], logits[1])


def set_vllm_env(monkeypatch, name: str, value: str) -> None:
    """A vLLM variable as `vllm.envs` reads it from now on (its cache, which would keep the
    first value read, turned off)."""
    import vllm.envs as envs

    if hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()
    monkeypatch.setenv(name, value)


@pytest.fixture
def plugged_config(tiny_model, monkeypatch):
    """A real engine config of the tiny model, with the plugin's function in vLLM's V1 sampler."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample import sampler

    config = EngineArgs(model=str(tiny_model), max_model_len=256).create_engine_config()
    monkeypatch.setattr(sampler, "apply_all_penalties", penalties.apply_all_penalties)
    return config


def test_the_plugin_leaves_vllm_alone_unless_named(monkeypatch):
    from vllm.v1.sample import sampler

    original = sampler.apply_all_penalties
    # recorded before register() patches it, so that teardown puts vLLM's function back
    monkeypatch.setattr(sampler, "apply_all_penalties", original)
    set_vllm_env(monkeypatch, "VLLM_PLUGINS", "")
    penalties.register()
    assert sampler.apply_all_penalties is original
    set_vllm_env(monkeypatch, "VLLM_PLUGINS", penalties.PLUGIN_NAME)
    penalties.register()
    assert sampler.apply_all_penalties is penalties.apply_all_penalties


def test_info_never_claims_these_penalties_where_the_v2_model_runner_samples(plugged_config, monkeypatch):
    """vLLM's V2 model runner (0.25's default for dense models on a GPU) applies penalties in
    its own kernel and never calls the V1 sampler's function, patched or not."""
    set_vllm_env(monkeypatch, "VLLM_USE_V2_MODEL_RUNNER", "1")
    assert plugged_config.use_v2_model_runner
    assert penalties.penalties_in_use(plugged_config) == "vllm"
    set_vllm_env(monkeypatch, "VLLM_USE_V2_MODEL_RUNNER", "0")
    assert not plugged_config.use_v2_model_runner
    assert penalties.penalties_in_use(plugged_config) == "seen tokens"


ENGINE_CHECK = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.v1.sample import sampler
from preprocess.engine import penalties

llm = LLM(sys.argv[1], enforce_eager=True, enable_prefix_caching=False, dtype="bfloat16", max_model_len=512,
          gpu_memory_utilization=0.3)
prompts = [f"Question {i}: name a colour, a number and a city." for i in range(12)]
on = SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=2.0, frequency_penalty=2.0,
                    presence_penalty=2.0, ignore_eos=True)
off = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
ids = lambda params: [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
stock, plain = ids(on), ids(off)
sampler.apply_all_penalties = penalties.apply_all_penalties
print("RESULT " + json.dumps({"stock": stock, "plain": plain, "seen_tokens": ids(on)}))
"""


def test_a_real_engine_answers_the_same_tokens_with_either_penalties(tiny_model, tmp_path):
    """vLLM on CPU with its engine in this child process (so that the swap reaches its
    sampler, and every batch is formed the same way), no prefix cache: the same 12 prompts
    with strong penalties, with vLLM's function and then with ours. The answers without
    penalties show that the penalties changed something to agree on."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = tmp_path / "engine_check.py"
    script.write_text(ENGINE_CHECK)
    done = subprocess.run([sys.executable, str(script), str(tiny_model)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    assert result["stock"] != result["plain"]
    assert result["seen_tokens"] == result["stock"]


def test_start_up_warns_when_fast_penalties_are_asked_for_but_vllm_applies_its_own(plugged_config, monkeypatch):
    """VLLM_FAST_PENALTIES=1 on a GPU, where the V2 model runner samples, is named at start-up
    as having no effect; asked for where the plugin acts, or not asked for, nothing is said."""
    from vllm.v1.sample import sampler

    set_vllm_env(monkeypatch, "VLLM_USE_V2_MODEL_RUNNER", "1")
    warning = penalties.ignored_fast_penalties(True, plugged_config)
    assert warning is not None and "V2 model runner" in warning and "VLLM_FAST_PENALTIES=1" in warning
    assert penalties.ignored_fast_penalties(False, plugged_config) is None
    set_vllm_env(monkeypatch, "VLLM_USE_V2_MODEL_RUNNER", "0")
    assert penalties.ignored_fast_penalties(True, plugged_config) is None
    monkeypatch.setattr(sampler, "apply_all_penalties", vllm_penalties.apply_all_penalties)  # the plugin not loaded
    assert "plugin is not loaded" in (penalties.ignored_fast_penalties(True, plugged_config) or "")
