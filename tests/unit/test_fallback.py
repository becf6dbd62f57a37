"""The start-up fallback chain, driven with the error texts vLLM really raises.

Error texts come from vLLM 0.32's source (and its pydantic validation, produced live):
- kv_cache_utils._check_enough_kv_cache_memory: "To serve at least one request with the
  model's max seq len (...) ... the estimated maximum model length is N. ..." and
  "No available memory for the cache blocks. ...";
- v1/engine/utils.wait_for_engine_startup: "Engine core initialization failed. See root
  cause above. Failed core proc(s): {...}" (the child's own error stays in its log);
- model_loader.get_model_loader: "Load format `awq` is not supported".
"""
import json

import pytest

from preprocess.engine_settings import SAFE_MAX_MODEL_LEN
from preprocess.engine.fallback import EngineStartError, build_with_fallbacks, estimated_max_len

KV_TEXT = ("To serve at least one request with the model's max seq len (40960), (5.62 GiB KV cache is needed, "
           "which is larger than the available KV cache memory (2.10 GiB). Based on the available memory, the "
           "estimated maximum model length is 15344. Try increasing `gpu_memory_utilization` (which also controls "
           "CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the engine.")
NO_MEMORY_TEXT = ("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
                  "initializing the engine (this flag also controls CPU memory reservation on the CPU backend, "
                  "despite its name).")
INIT_TEXT = "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}"
LOAD_FORMAT_TEXT = "Load format `awq` is not supported"


def real_compilation_config_error():
    """The ValidationError this vLLM raises for a JSON-string compilation_config."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from tests.conftest import TINY_MODEL, build_tiny_model

    build_tiny_model(TINY_MODEL)
    try:
        AsyncEngineArgs(model=str(TINY_MODEL), compilation_config='{"level": 0}').create_engine_config()
    except Exception as exc:
        return exc
    raise AssertionError("this vLLM accepted a string compilation_config")


def wrapped(outer_text, inner):
    """An engine-start error as the parent sees it: RuntimeError raised from the cause."""
    try:
        raise inner
    except Exception as cause:
        try:
            raise RuntimeError(outer_text) from cause
        except RuntimeError as outer:
            return outer


class Engine:
    """Records the attempts; raises the scripted error for each until one succeeds."""

    def __init__(self, *errors):
        self.errors = list(errors)
        self.attempts = []
        self.released = 0

    def __call__(self, kwargs):
        self.attempts.append(dict(kwargs))
        if self.errors:
            raise self.errors.pop(0)
        return "engine"

    def release(self):
        self.released += 1


def build(engine, kwargs, metax=False, model_max_len=None):
    return build_with_fallbacks(engine, kwargs, metax=metax, release=engine.release, model_max_len=model_max_len)


def test_compilation_config_string_rejected_retries_as_dict(caplog):
    engine = Engine(real_compilation_config_error())
    with caplog.at_level("WARNING"):
        result, used = build(engine, {"model": "m", "compilation_config": '{"level": 0}'})
    assert result == "engine" and used["compilation_config"] == {"level": 0}
    assert "step compilation" in caplog.text and "retrying it as a dict" in caplog.text
    assert engine.released == 1


def test_compilation_config_dict_rejected_retries_as_json_string():
    engine = Engine(TypeError("compilation_config must be a JSON string, got dict"))
    _, used = build(engine, {"model": "m", "compilation_config": {"level": 3}})
    assert used["compilation_config"] == json.dumps({"level": 3})


def test_load_format_rejected_retries_without_it(caplog):
    engine = Engine(ValueError(LOAD_FORMAT_TEXT))
    with caplog.at_level("WARNING"):
        _, used = build(engine, {"model": "m", "load_format": "awq"})
    assert "load_format" not in used
    assert "load_format='awq' rejected" in caplog.text


def test_load_format_hidden_behind_engine_init_failure_retries_without_it():
    engine = Engine(RuntimeError(INIT_TEXT))
    _, used = build(engine, {"model": "m", "load_format": "awq"})
    assert "load_format" not in used and len(engine.attempts) == 2


def test_metax_retries_with_enforce_eager_then_stops():
    engine = Engine(RuntimeError("mcBLAS error"))
    _, used = build(engine, {"model": "m"}, metax=True)
    assert used["enforce_eager"] is True
    with pytest.raises(EngineStartError):
        build(Engine(RuntimeError("x"), RuntimeError("y")), {"model": "m"}, metax=True)


def test_off_metax_no_eager_retry():
    with pytest.raises(EngineStartError, match="mcBLAS"):
        build(Engine(RuntimeError("mcBLAS error")), {"model": "m"}, metax=False)


def test_estimated_length_found_along_the_cause_chain(caplog):
    error = wrapped(INIT_TEXT, ValueError(KV_TEXT))
    assert estimated_max_len(error) == 15344
    engine = Engine(error)
    with caplog.at_level("WARNING"):
        _, used = build(engine, {"model": "m"})
    assert used["max_model_len"] == 15344
    assert "retrying with max_model_len=15344" in caplog.text


def test_kv_error_without_length_uses_the_safe_length_even_with_a_default_set():
    # metax: eager first, then the length step, which the reference skipped on MetaX
    engine = Engine(ValueError(NO_MEMORY_TEXT), ValueError(NO_MEMORY_TEXT))
    _, used = build(engine, {"model": "m", "max_model_len": 65536}, metax=True)
    assert used == {"model": "m", "max_model_len": SAFE_MAX_MODEL_LEN, "enforce_eager": True}


def test_engine_init_failure_without_length_uses_safe_length_capped_by_the_model():
    _, used = build(Engine(RuntimeError(INIT_TEXT)), {"model": "m"}, model_max_len=8192)
    assert used["max_model_len"] == 8192


def test_steps_run_in_order_each_once():
    engine = Engine(real_compilation_config_error(), ValueError(LOAD_FORMAT_TEXT), RuntimeError("driver"),
                    wrapped(INIT_TEXT, ValueError(KV_TEXT)))
    _, used = build(engine, {"model": "m", "compilation_config": '{"level": 0}', "load_format": "awq"}, metax=True)
    assert len(engine.attempts) == 5 and engine.released == 4
    assert used == {"model": "m", "compilation_config": {"level": 0}, "enforce_eager": True, "max_model_len": 15344}


def test_gives_up_with_the_root_cause_in_one_line():
    error = wrapped(INIT_TEXT, ValueError("CUDA out of memory.\nTried to allocate 2 GiB"))
    engine = Engine(error, error)
    with pytest.raises(EngineStartError) as info:
        build(engine, {"model": "m", "max_model_len": 1024})
    assert str(info.value) == "ValueError: CUDA out of memory. Tried to allocate 2 GiB"
    assert len(engine.attempts) == 1  # 1024 is already under the safe length: nothing left to try
