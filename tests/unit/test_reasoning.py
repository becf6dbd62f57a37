"""Thinking split out of answers (preprocess.reasoning) by vLLM's own reasoning parsers: the
configured parser is vLLM's (`auto` follows the tokenizer's own tags); a stream cut at any
token boundaries splits as the whole answer does; a request that turns thinking off gets
all content; the template alone decides whether an answer starts inside a block."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from preprocess.reasoning import (THINK_END, THINK_START, ParserUnavailable, Reasoning, configured, opens_reasoning,
                                  parser_name)
from shim.budget import PromptCounter

HERMES = (Path(__file__).resolve().parent.parent / "templates" / "hermes_tools.jinja").read_text()
# DeepSeek-R1's way: the generation prompt itself opens the block.
OPENING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
PARSERS = ("qwen3", "deepseek_r1")


@pytest.fixture(scope="module")
def thinking_tokenizer(tokenizer):
    """SmolLM2's tokenizer given the two tags as tokens, as Qwen3's and DeepSeek-R1's have them."""
    thinking = copy.deepcopy(tokenizer)
    thinking.add_tokens([THINK_START, THINK_END])
    return thinking


@pytest.fixture(scope="module")
def splits(thinking_tokenizer):
    return {name: Reasoning(name, thinking_tokenizer) for name in PARSERS}


def test_the_configured_parser_is_vllms(tokenizer, thinking_tokenizer, tiny_model, tmp_path):
    assert configured("auto", tiny_model, tokenizer) is None  # SmolLM2's tokenizer: no tags, no split
    assert configured("auto", tiny_model, thinking_tokenizer).name == "qwen3"
    assert configured("none", tiny_model, thinking_tokenizer) is None
    assert configured("deepseek_r1", tiny_model, tokenizer).name == "deepseek_r1"
    assert parser_name("auto", True, "deepseek_v3") == "deepseek_r1"
    from vllm.reasoning import ReasoningParserManager

    reasoning = configured("qwen3", tiny_model, tokenizer)
    assert isinstance(reasoning.parser(), ReasoningParserManager.get_reasoning_parser("qwen3"))
    with pytest.raises(ParserUnavailable, match="REASONING_PARSER='no-such-parser'"):
        configured("no-such-parser", tiny_model, tokenizer).load()


@pytest.mark.parametrize("name", PARSERS)
@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nplan\n</think>\n\nAnswer", False, ("\nplan\n", "\n\nAnswer")),  # Qwen3, thinking on
    ("plan</think>Answer", True, ("plan", "Answer")),  # DeepSeek-R1: the prompt opened it
    ("cut off mid-thought", True, ("cut off mid-thought", "")),
    ("<think>plan</think>", False, ("plan", "")),
])
def test_examples(splits, name, text, opened, expected):
    assert splits[name].split(text, opened) == expected


@pytest.mark.parametrize("name", PARSERS)
def test_an_answer_with_no_tags_is_reasoning_until_the_end_tag(splits, name):
    """vLLM's rule for both parsers (and so `vllm serve`'s): with thinking on, the model is
    thinking until it writes `</think>`."""
    assert splits[name].split("no tags at all") == ("no tags at all", "")


def test_thinking_turned_off_is_all_content(splits):
    """Qwen3's parser built with enable_thinking false, as vLLM's server builds it."""
    assert splits["qwen3"].split("no tags at all", thinking_disabled=True) == (None, "no tags at all")
    stream = splits["qwen3"].stream(thinking_disabled=True)
    assert stream.feed("no tags", [1, 2]) == ("", "no tags")


plain = st.lists(st.sampled_from(["<", "</", "<th", "ink>", "a", "答", "\n", " ", "think", "plan"]),
                 max_size=8).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PARSERS), plain, st.one_of(st.none(), plain), st.booleans(),
       st.lists(st.integers(0, 40), max_size=5))
def test_a_stream_cut_at_any_tokens_splits_as_the_whole_answer(splits, thinking_tokenizer, name, thought, answer,
                                                              model_opens, cuts):
    """The shapes a thinking model writes: its block (opened by itself or by the template),
    maybe closed, then the answer; streamed in pieces of whole tokens with their ids, as the
    generator sends them. Qwen3's parser: pieces of any size. DeepSeek-R1's (vLLM's
    BaseThinkingReasoningParser): one token per piece, the engine's usual step; a piece that
    holds `<think>` and more text with no `</think>` keeps the tag in its reasoning there,
    as it does in `vllm serve` (docs/api.md)."""
    if THINK_START in thought + (answer or "") or THINK_END in thought + (answer or ""):
        return
    text = (THINK_START if model_opens else "") + thought + ("" if answer is None else THINK_END + answer)
    ids = thinking_tokenizer.encode(text, add_special_tokens=False)
    bounds = ([0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)] if name == "qwen3"
              else list(range(len(ids) + 1)))
    stream = splits[name].stream(opened=not model_opens)
    parts, sent = [], ""
    for a, b in zip(bounds, bounds[1:]):
        if b > a:  # the text as vLLM's detokenizer releases it: a character split across tokens waits
            text_so_far = thinking_tokenizer.decode(ids[:b]).rstrip("\ufffd") if b < len(ids) else \
                thinking_tokenizer.decode(ids)
            parts.append(stream.feed(text_so_far[len(sent):], ids[a:b]))
            sent = text_so_far
    parts.append(stream.finish())
    whole_reasoning, whole_content = splits[name].split(text, opened=not model_opens)
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (whole_reasoning or "", whole_content)


def test_only_the_templates_own_tail_opens_a_block():
    assert opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not opens_reasoning("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def counters(tokenizer):
    made = {}
    for name, template in (("model", None), ("hermes", HERMES), ("opening", OPENING)):
        tok = copy.deepcopy(tokenizer)
        if template is not None:
            tok.chat_template = template
        made[name] = PromptCounter(tok)
    return made


def conversation(text: str, **extra) -> str:
    return json.dumps({"messages": [{"role": "user", "content": text}], **extra})


def test_the_shim_reads_the_block_state_from_the_template_as_preprocess_renders_it(counters):
    assert counters["opening"].opens_reasoning(conversation("q"), "Be brief.", "messages")
    assert counters["opening"].opens_reasoning("q", "Be brief.")  # a single question, the judge's shape
    assert not counters["hermes"].opens_reasoning(conversation("q", chat_template_kwargs={"enable_thinking": False}),
                                                  "Be brief.", "messages")
    assert not counters["model"].opens_reasoning(conversation("q"), "Be brief.", "messages")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=20).map(lambda t: t + THINK_START))
def test_no_message_can_open_a_block(counters, text):
    """A question that ends with the opening tag is the user's text, not the template's."""
    assert not counters["model"].opens_reasoning(conversation(text), "s", "messages")
    assert not counters["hermes"].opens_reasoning(conversation(text), "s", "messages")
