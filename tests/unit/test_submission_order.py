"""The order a batch's prompts go to the engine: one group per distinct sampling settings,
the groups allowed the most tokens first, nothing lost, nothing reordered within a group."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from preprocess.engine.generation import GenerationItem, group_by_sampling
from preprocess.sampling import SamplingSettings


def item(max_tokens: int, temperature: float) -> GenerationItem:
    return GenerationItem([1, 2, 3], SamplingSettings(max_tokens=max_tokens, temperature=temperature, top_p=1.0,
                                                      top_k=-1, repetition_penalty=1.0, frequency_penalty=0.0))


batches = st.lists(st.builds(item, st.sampled_from([1, 32, 64, 192, 4096]), st.sampled_from([0.0, 0.7])),
                   max_size=60)


@settings(max_examples=300, deadline=None)
@given(batches)
def test_every_prompt_is_submitted_once_longest_limits_first(items):
    groups = group_by_sampling(items)
    order = [index for indices in groups.values() for index in indices]
    assert sorted(order) == list(range(len(items)))
    limits = [sampling.max_tokens for sampling in groups]
    assert limits == sorted(limits, reverse=True)
    for sampling, indices in groups.items():
        assert indices == sorted(indices)
        assert all(items[i].sampling == sampling for i in indices)
    # equal limits keep the order their first prompt had in the batch
    ordered = list(groups.items())
    for (settings_a, indices_a), (settings_b, indices_b) in zip(ordered, ordered[1:]):
        if settings_a.max_tokens == settings_b.max_tokens:
            assert indices_a[0] < indices_b[0]


def test_the_judges_mix_puts_its_long_answers_ahead_of_the_short_ones():
    # the judge's batch: mostly short answers, long and code ones among them
    items = [item(32, 0.0), item(32, 0.0), item(192, 0.0), item(32, 0.0), item(64, 0.0), item(192, 0.0)]
    assert list(group_by_sampling(items).values()) == [[2, 5], [4], [0, 1, 3]]
