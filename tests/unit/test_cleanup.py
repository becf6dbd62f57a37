"""Answer clean-up rules, with Chinese examples (no server)."""
import pytest

from preprocess.cleanup import clean_answer, keep_sentences, strip_think, trim_examples
from preprocess.routing import Route
from preprocess.settings import load_cleanup


@pytest.mark.parametrize("raw, expected", [
    ("<think>先想一想</think>共享内存是片上存储。", "共享内存是片上存储。"),
    ("<think>a</think>答<think>b</think>案", "答案"),
    ("<think>答案在这里</think>", "答案在这里"),             # nothing left: keep the inside
    ("<think>第一</think><think>第二</think>", "第一"),       # the first block
    ("答案。<think>被截断的思考", "答案。"),                   # unclosed: the reference leaked it
    ("思考过程</think>最终答案", "最终答案"),                  # lone closing tag
    ("前文</think>", "前文"),
    ("没有标签", "没有标签"),
])
def test_strip_think(raw, expected):
    assert strip_think(raw) == expected


def test_trim_examples_before_markers_with_either_colon():
    assert trim_examples("共享内存速度快。例如：矩阵乘法") == "共享内存速度快"
    assert trim_examples("原子操作保证一致，比如: atomicAdd") == "原子操作保证一致"
    assert trim_examples("举例来说：x") == ""
    assert trim_examples("例如这样没有冒号") == "例如这样没有冒号"


def test_keep_sentences_keeps_separators_including_newlines():
    text = "一。二！三？四；五\n六。七。"
    assert keep_sentences(text, 3) == "一。二！三？"
    assert keep_sentences(text, 5) == "一。二！三？四；五"
    assert keep_sentences("第一行\n第二行\n第三行", 2) == "第一行\n第二行"


def settings(**env):
    return load_cleanup({k: str(v) for k, v in env.items()})


def test_short_answers_only():
    raw = "要点一。例如：很多例子。"
    assert clean_answer(raw, Route.SHORT, False, settings()) == "要点一"
    assert clean_answer(raw, Route.LONG_ANSWER, False, settings()) == raw
    assert clean_answer(raw, Route.CODE, True, settings()) == raw


def test_no_example_trim_for_code_questions_even_when_short():
    raw = "用 atomicAdd。例如：atomicAdd(&x, 1);"
    assert clean_answer(raw, Route.SHORT, True, settings()) == raw


def test_trim_examples_can_be_turned_off():
    raw = "要点。例如：x"
    assert clean_answer(raw, Route.SHORT, False, settings(OUTPUT_TRIM_EXAMPLES=0)) == raw


def test_max_sentences_default_clip_and_env():
    raw = "一。二。三。四。五。六。七。八。"
    assert clean_answer(raw, Route.SHORT, False, settings()) == "一。二。三。四。五。六。"
    assert clean_answer(raw, Route.SHORT, False, settings(OUTPUT_MAX_SENTENCES=2)) == "一。二。"
    assert settings(OUTPUT_MAX_SENTENCES=0).max_sentences == 1
    assert settings(OUTPUT_MAX_SENTENCES=50).max_sentences == 12


def test_raw_route_is_untouched():
    raw = "<think>x</think>一。例如：二"
    assert clean_answer(raw, Route.RAW, False, settings()) == raw
