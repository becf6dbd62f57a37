"""The generator's penalties give vLLM's logits bit for bit, against vLLM's own function.

Both sides get the same random logits, prompts, answers so far (with vLLM's -1 async
placeholders and rows that have seen nothing) and penalties; `torch.equal` on the
results, so one ulp apart fails.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
vllm_penalties = pytest.importorskip("vllm.v1.sample.ops.penalties")

from preprocess.engine import penalties  # noqa: E402

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


def test_the_plugin_leaves_vllm_alone_unless_named(monkeypatch):
    from vllm.v1.sample import sampler

    import vllm.envs as envs

    original = sampler.apply_all_penalties
    monkeypatch.setenv("VLLM_PLUGINS", "")
    envs.disable_envs_cache() if hasattr(envs, "disable_envs_cache") else None
    penalties.register()
    assert sampler.apply_all_penalties is original
    monkeypatch.setenv("VLLM_PLUGINS", penalties.PLUGIN_NAME)
    try:
        penalties.register()
        assert sampler.apply_all_penalties is penalties.apply_all_penalties
    finally:
        monkeypatch.setattr(sampler, "apply_all_penalties", original)
