"""vLLM engine arguments from the environment, filtered by the installed vLLM's signature."""
import pytest

from preprocess.engine.config import accepted_kwargs, check_attention_backend, engine_kwargs
from preprocess.engine_settings import SAFE_MAX_MODEL_LEN, load_engine
from preprocess.envparse import SettingsError


def test_reference_defaults_on_gpu():
    s = load_engine({}, metax=False, cpu_only=False)
    kw = engine_kwargs(s, "/m")
    assert kw["gpu_memory_utilization"] == 0.85 and kw["dtype"] == "float16"
    assert kw["enable_prefix_caching"] is True and kw["tensor_parallel_size"] == 1 and kw["enforce_eager"] is False
    assert kw["max_cudagraph_capture_size"] == 1024
    assert kw["compilation_config"] == {"backend": "eager"}
    assert kw["stream_interval"] == 8  # a streamed piece per 8 tokens after the first (vLLM's: 1)
    for unset in ("max_model_len", "quantization", "load_format", "kv_cache_dtype", "max_num_seqs",
                  "max_num_batched_tokens", "enable_chunked_prefill", "speculative_config"):
        assert unset not in kw


def test_graphs_compile_without_inductor_by_default_and_the_environment_wins():
    """Dynamo's graphs run as they are (no Inductor code generation at a cold start) wherever
    CUDA graphs are captured; VLLM_COMPILATION_CONFIG replaces the default whole ('{}': vLLM's
    own); with no graphs (CPU, MetaX, eager mode) vLLM decides."""
    assert load_engine({}, metax=False).compilation_config == {"backend": "eager"}
    assert load_engine({"VLLM_COMPILATION_CONFIG": "{}"}, metax=False).compilation_config == {}
    assert load_engine({"VLLM_COMPILATION_CONFIG": '{"mode": 3}'}, metax=False).compilation_config == {"mode": 3}
    for environ, metax, cpu in (({}, True, False), ({}, False, True), ({"VLLM_ENFORCE_EAGER": "1"}, False, False)):
        settings = load_engine(environ, metax=metax, cpu_only=cpu)
        assert settings.compilation_config is None and "compilation_config" not in engine_kwargs(settings, "/m")


def test_cuda_graphs_cover_every_decode_batch_by_default():
    """On a GPU the graphs reach the scheduler's batch (1024, or VLLM_MAX_NUM_SEQS); the
    environment wins; no graphs, no setting."""
    assert load_engine({}, metax=False).max_cudagraph_capture_size == 1024
    assert load_engine({"VLLM_MAX_NUM_SEQS": "300"}, metax=False).max_cudagraph_capture_size == 300
    assert load_engine({"VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE": "256"}, metax=False).max_cudagraph_capture_size == 256
    for no_graphs in (load_engine({}, cpu_only=True), load_engine({"VLLM_ENFORCE_EAGER": "1"}, metax=False),
                      load_engine({}, metax=True)):
        assert no_graphs.max_cudagraph_capture_size is None


def test_metax_defaults():
    kw = engine_kwargs(load_engine({}, metax=True), "/m")
    assert kw["gpu_memory_utilization"] == 0.60 and kw["max_model_len"] == SAFE_MAX_MODEL_LEN
    assert kw["enable_chunked_prefill"] is False
    assert engine_kwargs(load_engine({"DEFAULT_MAX_MODEL_LEN": "4096"}, metax=True), "/m")["max_model_len"] == 4096


def test_every_variable_reaches_its_argument():
    env = {"GPU_MEMORY_UTILIZATION": "0.5", "DTYPE": "bfloat16", "MAX_MODEL_LEN": "2048", "VLLM_QUANTIZATION": "awq",
           "VLLM_LOAD_FORMAT": "safetensors", "KV_CACHE_DTYPE": "fp8", "ENABLE_PREFIX_CACHING": "0",
           "VLLM_MAX_NUM_SEQS": "64", "VLLM_MAX_NUM_BATCHED_TOKENS": "8192", "VLLM_TOKENIZER_POOL_SIZE": "2",
           "VLLM_TOKENIZER_POOL_TYPE": "ray", "TENSOR_PARALLEL_SIZE": "2", "VLLM_ENFORCE_EAGER": "1",
           "ENABLE_CHUNKED_PREFILL": "1", "VLLM_COMPILATION_CONFIG": '{"level": 3}',
           "VLLM_ATTENTION_BACKEND": "TRITON_ATTN", "VLLM_STREAM_INTERVAL": "16"}
    kw = engine_kwargs(load_engine(env, metax=False), "/m")
    assert kw == {"model": "/m", "tokenizer": "/m", "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
                  "dtype": "bfloat16", "enable_prefix_caching": False, "disable_log_stats": False,
                  "enforce_eager": True, "max_model_len": 2048, "quantization": "awq", "load_format": "safetensors",
                  "kv_cache_dtype": "fp8", "max_num_seqs": 64, "max_num_batched_tokens": 8192,
                  "tokenizer_pool_size": 2, "tokenizer_pool_type": "ray", "enable_chunked_prefill": True,
                  "compilation_config": {"level": 3}, "attention_backend": "TRITON_ATTN",
                  "stream_interval": 16}
    assert engine_kwargs(load_engine({"VLLM_KV_CACHE_DTYPE": "fp8_e5m2", "KV_CACHE_DTYPE": "fp8"}), "/m")[
        "kv_cache_dtype"] == "fp8_e5m2"


def test_speculative_ngram_forces_chunked_prefill_off_and_clips():
    env = {"ENABLE_SPECULATIVE_DECODING": "1", "ENABLE_CHUNKED_PREFILL": "1", "SPEC_NUM_SPECULATIVE_TOKENS": "99",
           "SPEC_DISABLE_BY_BATCH_SIZE": "32"}
    kw = engine_kwargs(load_engine(env, metax=False), "/m")
    assert kw["enable_chunked_prefill"] is False
    assert kw["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 32, "prompt_lookup_max": 8,
                                        "prompt_lookup_min": 1, "disable_by_batch_size": 32}
    draft = engine_kwargs(load_engine({"ENABLE_SPECULATIVE_DECODING": "1", "SPEC_METHOD": "draft_model",
                                       "SPEC_DRAFT_MODEL_DIR": "/d", "SPEC_DRAFT_MAX_MODEL_LEN": "4096"}), "/m")
    assert draft["speculative_config"] == {"method": "draft_model", "num_speculative_tokens": 6, "model": "/d",
                                           "max_model_len": 4096}
    with pytest.raises(SettingsError, match="SPEC_DRAFT_MODEL_DIR"):
        load_engine({"ENABLE_SPECULATIVE_DECODING": "1", "SPEC_METHOD": "draft_model"})


def test_bad_compilation_config_and_choices_are_one_line_errors():
    with pytest.raises(SettingsError, match="VLLM_COMPILATION_CONFIG"):
        load_engine({"VLLM_COMPILATION_CONFIG": "{level"})
    with pytest.raises(SettingsError, match="VLLM_STREAM_INTERVAL='four'"):
        load_engine({"VLLM_STREAM_INTERVAL": "four"})
    assert load_engine({"VLLM_STREAM_INTERVAL": "0"}).stream_interval == 1  # integers are clipped, not refused
    with pytest.raises(SettingsError, match="USE_VLLM='maybe'"):
        load_engine({"USE_VLLM": "maybe"})


def test_attention_backend_reaches_vllms_config_and_a_wrong_name_is_a_one_line_error(tiny_model):
    """VLLM_ATTENTION_BACKEND (vLLM's own former variable, which vLLM 0.25 no longer reads) becomes
    `attention_backend`, and a real engine config takes it; a name vLLM does not know stops
    start-up with the names it does."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    settings = load_engine({"VLLM_ATTENTION_BACKEND": "triton_attn"})
    check_attention_backend(settings.attention_backend)
    kwargs, _ = accepted_kwargs({**engine_kwargs(settings, str(tiny_model)), "max_model_len": 256},
                                AsyncEngineArgs.__init__)
    config = AsyncEngineArgs(**kwargs).create_engine_config()
    assert config.attention_config.backend.name == "TRITON_ATTN"
    check_attention_backend("auto")
    check_attention_backend(None)
    with pytest.raises(SettingsError, match=r"VLLM_ATTENTION_BACKEND='FLASH_ATTENTON' .*one of: auto, .*FLASH_ATTN"):
        check_attention_backend("FLASH_ATTENTON")


def test_only_arguments_this_vllm_accepts_are_passed():
    from vllm.engine.arg_utils import AsyncEngineArgs

    kept, dropped = accepted_kwargs({"model": "/m", "dtype": "bfloat16", "made_up_future_flag": 1,
                                     "tokenizer_pool_size": 2}, AsyncEngineArgs.__init__)
    assert kept["model"] == "/m" and "made_up_future_flag" not in kept
    assert "made_up_future_flag" in dropped

    def open_ended(**kwargs):
        return kwargs

    assert accepted_kwargs({"x": 1}, open_ended) == ({"x": 1}, [])


@pytest.mark.parametrize("environ, stats", [
    ({}, True), ({"BATCH_MODE": "1"}, False), ({"BATCH_MODE": "1", "VLLM_ENGINE_STATS": "1"}, True),
    ({"VLLM_ENGINE_STATS": "0"}, False),
])
def test_engine_statistics_are_off_by_default_only_in_batch_mode(environ, stats):
    settings = load_engine(environ)
    assert settings.engine_stats is stats
    assert engine_kwargs(settings, "/m")["disable_log_stats"] is (not stats)
