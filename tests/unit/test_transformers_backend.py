"""The transformers backend serves the generator's contract for real (tiny Llama, CPU)."""
import threading

import pytest

from preprocess.chat import ChatFormatter
from preprocess.engine.generation import GenerationItem
from preprocess.engine.service import stop_token_ids
from preprocess.sampling import SamplingSettings


@pytest.fixture(scope="module")
def runner(tiny_model, tokenizer):
    from preprocess.engine.hf_runner import TransformersRunner

    r = TransformersRunner(str(tiny_model), tokenizer, ["<|im_end|>"], stop_token_ids(tokenizer, ["<|im_end|>"]))
    yield r
    r.shutdown(5)


def run(runner, items):
    done = threading.Event()
    box = {}

    def finished(outcome):
        box["outcome"] = outcome
        done.set()

    runner.submit(items, finished)
    assert done.wait(120)
    if isinstance(box["outcome"], BaseException):
        raise box["outcome"]
    return box["outcome"]


def sampling(max_tokens, **kw):
    base = dict(temperature=0.0, top_p=1.0, top_k=1, repetition_penalty=1.05, frequency_penalty=0.1)
    return SamplingSettings(max_tokens=max_tokens, **{**base, **kw})


def test_batch_generates_together_without_echoing_the_prompt(runner, tokenizer):
    formatter = ChatFormatter(tokenizer)
    prompts = formatter.format_batch("sys", ["short", "a much longer question " * 5])
    items = [GenerationItem(p.token_ids, sampling(6, ignore_eos=True)) for p in prompts]
    groups = []
    runner.on_submit = lambda submitted, count: groups.append(count)
    results = run(runner, items)
    assert groups == [1]  # one generate() call for the whole group
    assert [r.completion_tokens for r in results] == [6, 6]
    assert [r.prompt_tokens for r in results] == [len(p.token_ids) for p in prompts]
    for result in results:
        assert "sys" not in result.text and "question" not in result.text


def test_groups_by_sampling_settings(runner, tokenizer):
    ids = tokenizer("hello", add_special_tokens=False).input_ids
    items = [GenerationItem(ids, sampling(2, ignore_eos=True)), GenerationItem(ids, sampling(3, ignore_eos=True)),
             GenerationItem(ids, sampling(2, ignore_eos=True))]
    groups = []
    runner.on_submit = lambda submitted, count: groups.append(count)
    results = run(runner, items)
    assert groups == [2]
    assert [r.completion_tokens for r in results] == [2, 3, 2]


def test_stop_token_is_honoured(runner, tokenizer):
    """Make the stop token likely: generation ends early, without the marker in the text."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        runner.model.lm_head.weight[eos] += 100.0  # raises the eos logit for most hidden states
    try:
        result = run(runner, [GenerationItem([1, 2, 3], sampling(8))])[0]
        forced = run(runner, [GenerationItem([1, 2, 3], sampling(8, ignore_eos=True))])[0]
    finally:
        with torch.no_grad():
            runner.model.lm_head.weight[eos] -= 100.0
    assert forced.completion_tokens == 8
    assert result.completion_tokens < 8 and result.finish_reason == "stop"
    assert "<|im_end|>" not in result.text


def test_prompt_longer_than_the_model_is_refused(runner):
    from preprocess.engine.generation import PromptTooLong, check_prompt_lengths

    assert runner.max_model_len == 1024
    with pytest.raises(PromptTooLong, match="prompt 1 has 2000 tokens; the model length is 1024"):
        check_prompt_lengths([GenerationItem([5] * 10, sampling(2)), GenerationItem([5] * 2000, sampling(2))],
                             runner.max_model_len)


def test_no_tokenizer_is_a_clear_start_error(tiny_model):
    from preprocess.engine.hf_runner import TransformersRunner

    with pytest.raises(RuntimeError, match="needs the model's tokenizer"):
        TransformersRunner(str(tiny_model), None, [], [])


def test_no_stop_ids_still_generates_to_the_limit(tiny_model, tokenizer):
    from preprocess.engine.hf_runner import TransformersRunner

    r = TransformersRunner(str(tiny_model), tokenizer, [], [])
    try:
        ids = tokenizer("hello there", add_special_tokens=False).input_ids
        result = run(r, [GenerationItem(ids, sampling(5, ignore_eos=True))])[0]
        assert result.completion_tokens == 5 and result.finish_reason == "length"
    finally:
        r.shutdown(5)


def test_stop_string_is_honoured(tiny_model, tokenizer):
    """The tiny model says " GPU" at every step, so "U G" first appears with the second token:
    generation stops there and the text is cut before the stop string."""
    from preprocess.engine.hf_runner import TransformersRunner

    r = TransformersRunner(str(tiny_model), tokenizer, ["U G"], stop_token_ids(tokenizer, []))
    try:
        ids = tokenizer("hello there", add_special_tokens=False).input_ids
        result = run(r, [GenerationItem(ids, sampling(8))])[0]
        assert (result.text, result.completion_tokens, result.finish_reason) == (" GP", 2, "stop")
    finally:
        r.shutdown(5)
