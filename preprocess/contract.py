"""The request contract, written once: every per-request setting, its ensemble tensor and
dtype, and the range the engine accepts.

The shim checks a request against this table before anything reaches Triton, the
preprocess stage checks the same table again (clients may call Triton directly), and the
Triton models and `config.pbtxt` files use the same names and dtypes
(`tests/unit/test_contract.py` reads the configs). The ranges are vLLM's own
`SamplingParams` checks, narrowed where this service's contract is narrower
(docs/differences.md), so the engine never sees a value it would refuse (an engine refusal would surface as a 5xx).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_NEW_TOKENS_LIMIT = 4096  # /predict clips max_new_tokens to 1..4096; /v1 refuses more
PAD_ID = -1  # never a token id: pads the shorter prompts of PROMPT_IDS
ENSEMBLE = "llm"
STREAM_ENSEMBLE = "llm_stream"  # the same inputs; decoupled, one response per piece (gRPC streaming)
PREPROCESS = "preprocess"
MAX_BATCH_SIZE = 512  # every config.pbtxt's max_batch_size; the shim reads Triton's and uses this until then


NUMPY_TYPES = {"INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "BOOL": np.bool_}


class InvalidRequest(ValueError):
    """The request itself is wrong: the caller gets a 4xx naming the problem."""


class OutOfRange(InvalidRequest):
    """A setting outside the engine's range; the message names the field and the range."""


@dataclass(frozen=True)
class Setting:
    """One per-request setting: ensemble input `name`, its Triton dtype, and its range."""
    name: str
    triton_type: str  # "INT32", "INT64", "FP32", "BOOL"
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # (low, ...] instead of [low, ...]
    also: tuple[int, ...] = ()  # single values allowed outside the range (top_k -1 = off)

    @property
    def numpy_type(self):
        return NUMPY_TYPES[self.triton_type]

    @property
    def range_text(self) -> str:
        if self.triton_type == "BOOL":
            return "true or false"
        text = f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"
        return " or ".join([*(str(v) for v in self.also), text]) if self.also else text

    def problem(self, value: Any) -> str | None:
        """Why `value` is refused, or None when the engine accepts it."""
        if self.triton_type == "BOOL":
            return None if isinstance(value, (bool, np.bool_)) else f"{self.name} must be true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            return f"{self.name} must be a number, got {value!r}"
        number = float(value)
        if not math.isfinite(number):
            return f"{self.name} must be a finite number, got {value!r}"
        if self.triton_type.startswith("INT"):
            if number != int(number):
                return f"{self.name} must be an integer, got {value!r}"
            number = int(value)  # exact: a float would round 2**63 - 1 up, past the bound
        if number in self.also:
            return None
        below = number <= self.low if self.low_open else number < self.low
        if below or number > self.high:
            return f"{self.name} must be in {self.range_text}, got {_num(value)}"
        return None

    def check(self, value: Any) -> None:
        problem = self.problem(value)
        if problem is not None:
            raise OutOfRange(problem)


def _num(value) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs; the OpenAI API's top_logprobs limit too
NOT_SET = -1  # SEED and TOP_LOGPROBS between preprocess and the generator: not asked for

# Sampling settings, in the order of the ensemble's inputs. The ranges are vLLM's
# (temperature [0, 2], top_p (0, 1], penalties [-2, 2]) except repetition_penalty, which
# vLLM leaves open above and the contract caps at 2, and top_k 0, which vLLM takes as
# "off" and the contract refuses (-1 is "off").
SAMPLING = (
    Setting("max_new_tokens", "INT32", 1, MAX_NEW_TOKENS_LIMIT),
    Setting("temperature", "FP32", 0.0, 2.0),
    Setting("top_p", "FP32", 0.0, 1.0, low_open=True),
    Setting("top_k", "INT32", 1, INT32_MAX, also=(-1,)),
    Setting("repetition_penalty", "FP32", 0.0, 2.0, low_open=True),
    Setting("frequency_penalty", "FP32", -2.0, 2.0),
    Setting("presence_penalty", "FP32", -2.0, 2.0),
)
# Request controls with no server default: absent means off.
CONTROLS = (
    Setting("seed", "INT64", 0, INT64_MAX),  # the same seed, the same sampled text
    Setting("top_logprobs", "INT32", 0, MAX_TOP_LOGPROBS),  # per generated token: its logprob and the top N
)
FLAGS = (
    Setting("ignore_eos", "BOOL"),  # benchmarks: generate exactly max_new_tokens
    Setting("raw", "BOOL"),  # skip routing and clean-up
    Setting("verbatim", "BOOL"),  # the prompt as given: no template, routing or clean-up (completions)
    Setting("split_reasoning", "BOOL"),  # thinking split out into the `reasoning` output, not dropped (OpenAI chat)
)
SETTINGS = {s.name: s for s in SAMPLING + CONTROLS + FLAGS}
SAMPLING_NAMES = tuple(s.name for s in SAMPLING if s.name != "max_new_tokens")


def clip_new_tokens(value: int) -> int:
    """A request's own token limit on the judge's routes: clipped to 1..MAX_NEW_TOKENS_LIMIT,
    as the replaced service clipped it (the OpenAI routes refuse an over-limit value instead)."""
    return min(max(int(value), 1), MAX_NEW_TOKENS_LIMIT)


# Ensemble inputs that carry text. `prompt` is one question, `messages` a whole
# conversation (a JSON array of {"role", "content"}; see preprocess.conversation); a row
# has one or the other. `stop` is a JSON array of strings, `response_format` the OpenAI
# object (see preprocess.controls).
TEXT_INPUTS = ("prompt", "system_prompt", "messages", "stop", "response_format")
# The ensemble's outputs: the first four are what every caller gets; `logprobs` (JSON per
# row, "" when not asked for), `prompt_ids` (the prompt's token ids, padded with PAD_ID) and
# `reasoning` (the thinking split out of the answer, "" unless the row set `split_reasoning`) only
# go out when requested.
OUTPUTS = ("answer", "prompt_tokens", "completion_tokens", "finish_reason")
OPTIONAL_OUTPUTS = ("logprobs", "prompt_ids", "reasoning")
# From preprocess to postprocess, per row: what clean-up does with thinking
# (preprocess.reasoning.ReasoningMode).
REASONING_MODE = ("REASONING", "INT32")
# llm_stream's outputs, per response: the text and tokens since the previous one; the
# finish reason ("" until the last); logprobs of the piece's tokens (JSON, "" when not asked
# for); `token_ids`, the piece's token ids; `error`, "" unless the stream failed. A decoupled model's Triton error reaches a gRPC
# client as text alone, so a failed stream ends in band instead: its last response has
# finish_reason STREAM_FAILED, the kind (preprocess.errors.ErrorKind's value) in `error` and
# the message in `text`.
STREAM_OUTPUTS = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "logprobs", "token_ids", "error")
STREAM_FAILED = "error"
EXPLAIN_OUTPUTS = ("ROUTE", "MAX_TOKENS", "IS_CODE", "PROMPT_TEXT", "PROMPT_IDS")

# What preprocess hands the generator: (tensor name, dtype) per sampling value.
GENERATOR_SCALARS = (
    ("MAX_TOKENS", "INT32", "max_tokens"),
    ("TEMPERATURE", "FP32", "temperature"),
    ("TOP_P", "FP32", "top_p"),
    ("TOP_K", "INT32", "top_k"),
    ("REPETITION_PENALTY", "FP32", "repetition_penalty"),
    ("FREQUENCY_PENALTY", "FP32", "frequency_penalty"),
    ("PRESENCE_PENALTY", "FP32", "presence_penalty"),
    ("SEED", "INT64", "seed"),  # NOT_SET: none
    ("TOP_LOGPROBS", "INT32", "top_logprobs"),  # NOT_SET: no logprobs
    ("IGNORE_EOS", "BOOL", "ignore_eos"),
)
# ... and per text control: (tensor name, field), canonical JSON, "" when not set.
GENERATOR_TEXTS = (
    ("STOP", "stop"),
    ("RESPONSE_FORMAT", "response_format"),
)

# OpenAI-door limits (request fields that are not ensemble inputs).
MAX_CHOICES = 16  # n


def check_settings(values: dict[str, Any]) -> None:
    """Every given setting within its range, or OutOfRange naming the first one that is not."""
    for name, value in values.items():
        if value is not None and name in SETTINGS:
            SETTINGS[name].check(value)
