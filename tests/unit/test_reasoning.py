"""Thinking split out of answers (preprocess.reasoning): a stream and a whole reply split the
same text the same way, whatever the pieces; the template alone decides whether an answer
starts inside a block; `auto` follows the tokenizer's own tags."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from preprocess.reasoning import THINK_END, THINK_START, ReasoningSplitter, opens_reasoning, split_reasoning
from shim.budget import PromptCounter

HERMES = (Path(__file__).resolve().parent.parent / "templates" / "hermes_tools.jinja").read_text()
# DeepSeek-R1's way: the generation prompt itself opens the block.
OPENING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")

# Text made mostly of tag fragments, so that tags split across pieces are common.
fragments = st.sampled_from([THINK_START, THINK_END, "<", "</", "<th", "ink>", "think>", "</thi", "a", "答", "\n", " "])
answers = st.lists(fragments, max_size=12).map("".join)


def streamed(text: str, cuts: list[int], opened: bool) -> tuple[str | None, str]:
    splitter = ReasoningSplitter(opened)
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    parts = [splitter.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [splitter.finish()]
    return ("".join(r for r, _ in parts) if splitter.seen else None), "".join(c for _, c in parts)


@settings(max_examples=400, deadline=None)
@given(answers, st.lists(st.integers(0, 200), max_size=6), st.booleans())
def test_any_pieces_split_as_the_whole_text(text, cuts, opened):
    assert streamed(text, cuts, opened) == split_reasoning(text, opened)


@settings(max_examples=400, deadline=None)
@given(answers, st.booleans())
def test_only_whole_tags_are_removed_and_an_opening_tag_always_opens(text, opened):
    reasoning, content = split_reasoning(text, opened)
    if THINK_START in text or opened:
        assert reasoning is not None
    else:
        assert (reasoning, content) == (None, text)
    # Nothing but whole tags is removed.
    removed = len(text) - len(reasoning or "") - len(content)
    assert any(removed == a * len(THINK_START) + b * len(THINK_END) for a in range(13) for b in range(13))


@pytest.mark.parametrize("text, opened, expected", [
    ("<think>\nplan\n</think>\n\nAnswer", False, ("\nplan\n", "\n\nAnswer")),  # Qwen3, thinking on
    ("plan</think>Answer", True, ("plan", "Answer")),  # DeepSeek-R1: the prompt opened it
    ("cut off mid-thought", True, ("cut off mid-thought", "")),
    ("Answer <think>cut off", False, ("cut off", "Answer ")),
    ("no thinking at all", False, (None, "no thinking at all")),
    ("a stray </think> stays", False, (None, "a stray </think> stays")),
    ("<think></think>Answer", False, ("", "Answer")),  # an empty block: reasoning, empty
    ("ends with <thi", False, (None, "ends with <thi")),  # a tag begun, never finished, is text
])
def test_examples(text, opened, expected):
    assert split_reasoning(text, opened) == expected


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


def test_auto_follows_the_tokenizers_own_tags(tokenizer):
    assert not PromptCounter(tokenizer).has_think_tokens()  # SmolLM2's: no tags
    thinking = copy.deepcopy(tokenizer)
    thinking.add_tokens([THINK_START, THINK_END])
    assert PromptCounter(thinking).has_think_tokens()


@pytest.fixture(scope="module")
def vllm_r1_parser(tokenizer):
    """vLLM's own DeepSeek-R1 parser, on a tokenizer given the two tags (it requires them)."""
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser

    thinking = copy.deepcopy(tokenizer)
    thinking.add_tokens([THINK_START, THINK_END])
    return DeepSeekR1ReasoningParser(thinking)


plain = st.lists(st.sampled_from(["<", "</", "<th", "ink>", "a", "答", "\n", " ", "think"]), max_size=8).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plain, st.one_of(st.none(), plain), st.booleans())
def test_the_split_is_vllms_deepseek_r1_split(vllm_r1_parser, thought, answer, model_opens):
    """Where vLLM's parser and ours read the same situation, they split the same: an answer
    whose block the template opened (R1's), or one that opens it itself (Qwen3 thinking), with
    or without its end. vLLM says None for an empty content; we say ""."""
    if THINK_START in thought or THINK_END in thought or (answer and THINK_START in answer):
        return
    text = (THINK_START if model_opens else "") + thought + ("" if answer is None else THINK_END + answer)
    reasoning, content = vllm_r1_parser.extract_reasoning(text, request=None)
    assert split_reasoning(text, opened=not model_opens) == (reasoning, content or "")
