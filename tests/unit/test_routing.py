"""Length routing and the settings that drive it (no server)."""
import pytest

from preprocess.routing import Route, classify, decide
from preprocess.contract import MAX_NEW_TOKENS_LIMIT
from preprocess.settings import SettingsError, load_routing


def routing(**env):
    return load_routing({k: str(v) for k, v in env.items()})


@pytest.mark.parametrize("question, route", [
    ("__global__ void add(){} kernel<<<1,1>>>", Route.HARD_CODE),
    ("#include <cuda.h> 写出代码", Route.HARD_CODE),
    ("用 Triton 写一个 softmax 算子", Route.LONG_ANSWER),
    ("Explain im2col for ConvNets", Route.LONG_ANSWER),
    ("SpMV 的 CSR 格式", Route.LONG_ANSWER),
    ("Tensor Cores 如何加速", Route.LONG_ANSWER),
    ("TileLang 是什么", Route.LONG_ANSWER),
    ("给出核心代码", Route.CODE),
    ("伪代码描述归约", Route.CODE),
    ("import torch 之后做什么", Route.CODE),
    ("def f(): 的含义", Route.CODE),
    ("什么是 warp？", Route.SHORT),
    ("What is a CUDA kernel?", Route.SHORT),
])
def test_each_class(question, route):
    assert classify(question, routing()) is route


def test_order_hard_code_beats_long_beats_code():
    s = routing()
    assert classify("gemm kernel<<<grid, block>>> 代码", s) is Route.HARD_CODE
    assert classify("gemm 代码", s) is Route.LONG_ANSWER
    assert classify("代码", s) is Route.CODE


def test_keywords_match_stripped_lowercased():
    assert classify("   GEMM   ", routing()) is Route.LONG_ANSWER
    assert classify("KERNEL<<<", routing()) is Route.HARD_CODE


def test_default_limits():
    """32 for short answers is the replaced service's documented default; 64 (soft code) and
    192 (code, long answer; hard code follows code) are its shipped values, kept so that
    existing deployments answer the same."""
    s = routing()
    assert decide("什么是 warp", s).max_new_tokens == 32
    assert decide("给出代码", s).max_new_tokens == 64
    assert decide("gemm 原理", s).max_new_tokens == 192
    assert decide("#include", s).max_new_tokens == 192  # HARD defaults to CODE


def test_hard_follows_code_unless_set():
    assert decide("#include", routing(MAX_NEW_TOKENS_CODE=300)).max_new_tokens == 300
    assert decide("#include", routing(MAX_NEW_TOKENS_CODE=300, MAX_NEW_TOKENS_CODE_HARD=400)).max_new_tokens == 400


def test_env_keywords_are_appended():
    s = routing(CODE_QUESTION_KEYWORDS="写个程序, Kernel函数", LONG_ANSWER_KEYWORDS="FlashAttention",
                HARD_CODE_QUESTION_KEYWORDS="__shared__")
    assert classify("帮我写个程序", s) is Route.CODE
    assert classify("kernel函数", s) is Route.CODE
    assert classify("flashattention 原理", s) is Route.LONG_ANSWER
    assert classify("__shared__ float x", s) is Route.HARD_CODE
    assert classify("代码", s) is Route.CODE  # built-ins stay


def test_min_hits_thresholds_and_their_clip():
    s = routing(HARD_CODE_MIN_HITS=2, LONG_ANSWER_MIN_HITS=2)
    assert classify("#include 写", s) is Route.CODE  # one hard hit is not enough, but it is a code keyword
    assert classify("#include kernel<<<", s) is Route.HARD_CODE
    assert classify("gemm", s) is Route.SHORT
    assert classify("gemm im2col", s) is Route.LONG_ANSWER
    assert routing(HARD_CODE_MIN_HITS=0).hard_code_min_hits == 1
    assert routing(HARD_CODE_MIN_HITS=99).hard_code_min_hits == 5
    assert routing(LONG_ANSWER_MIN_HITS=-3).long_answer_min_hits == 1
    assert routing(LONG_ANSWER_MIN_HITS=6).long_answer_min_hits == 5


def test_long_answer_can_be_disabled():
    assert classify("gemm", routing(LONG_ANSWER_ENABLE_DEFAULT="off")) is Route.SHORT


def test_disable_routing_sends_everything_to_max_new_tokens():
    s = routing(DISABLE_TOKEN_ROUTING="yes", MAX_NEW_TOKENS=20)
    for q in ("#include", "gemm", "代码", "hi"):
        d = decide(q, s)
        assert (d.route, d.max_new_tokens) == (Route.SHORT, 20)


# The replaced service clipped every token limit to 1..4096; the bounds are tested just
# inside and just outside, from the one constant the code uses.
LIMIT = MAX_NEW_TOKENS_LIMIT


@pytest.mark.parametrize("override, used", [(5, 5), (1, 1), (0, 1), (-3, 1), (LIMIT, LIMIT), (LIMIT + 1, LIMIT)])
def test_request_override_wins_and_is_clipped(override, used):
    decision = decide("gemm", routing(), override=override)
    assert decision.max_new_tokens == used and decision.route is Route.LONG_ANSWER


@pytest.mark.parametrize("value, used", [(0, 1), (1, 1), (LIMIT, LIMIT), (LIMIT + 1, LIMIT)])
def test_token_limits_are_clipped(value, used):
    assert routing(MAX_NEW_TOKENS=value).max_new_tokens == used
    assert routing(MAX_NEW_TOKENS_CODE=value).max_new_tokens_code_hard == used


def test_malformed_number_names_variable_and_value():
    with pytest.raises(SettingsError, match=r"MAX_NEW_TOKENS='abc' is not an integer"):
        routing(MAX_NEW_TOKENS="abc")


def test_log_token_routing_logs_buckets(caplog):
    from preprocess.routing import log_buckets

    s = routing(LOG_TOKEN_ROUTING=1)
    assert s.log_routing
    with caplog.at_level("INFO", logger="preprocess.routing"):
        log_buckets([decide(q, s) for q in ("hi", "yo", "gemm")])
    assert "short/32: 2" in caplog.text and "long_answer/192: 1" in caplog.text
