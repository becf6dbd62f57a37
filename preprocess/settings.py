"""Every environment variable of the service, parsed and validated once per process.

`load(environ)` builds one frozen `Settings`; the shim, its routes and each Triton model
read from it and never from the environment. Names and defaults are the replaced
service's, so existing deployment settings keep working. A malformed value raises
`SettingsError` with one clear line, naming the variable and the value. The `load_*`
parts are public for tests and tools that need one section only.

The one exception is `BATCH_MODE`, which the health answer reads live (`batch_mode`), so
that an operator can flip it on a running server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from .contract import MAX_NEW_TOKENS_LIMIT
from .engine_settings import EngineSettings, load_engine
from .envparse import Env, SettingsError

__all__ = [
    "SettingsError", "RoutingSettings", "CleanupSettings", "SamplingDefaults", "ChatSettings",
    "WarmupSettings", "ShimSettings", "GrammarSettings", "load_routing", "load_cleanup", "load_sampling",
    "load_chat", "load_warmup", "load_shim", "load_grammar", "batch_mode", "resolve_model_dir", "Settings", "load",
    "DEFAULT_SYSTEM_PROMPT", "SYSTEM_PROMPT_MAX_CHARS", "MAX_NEW_TOKENS_LIMIT",
]

EMBEDDED_MODEL_ID = "SmolLM2-135M-Instruct"
SYSTEM_PROMPT_MAX_CHARS = 20_000

DEFAULT_SYSTEM_PROMPT = (
    "你是答题助手。只输出答案正文，不要推理过程，不要客套话。"
    "用教科书式的规范表述，给出3-6个简短的关键要点，不要举例。"
    "代码题只给出最短的核心代码，不要使用代码块标记。"
)

HARD_CODE_KEYWORDS = ("kernel<<<", "global void", "#include")
LONG_ANSWER_KEYWORDS = ("算子", "spmv", "convnets", "im2col", "gemm", "tensor cores", "triton", "tilelang")
CODE_KEYWORDS = ("代码", "伪代码", "核心代码", "代码片段", "kernel<<<", "global void", "#include", "import ", "def ")
DEFAULT_STOP_STRINGS = ("<|im_end|>", "<|endoftext|>")


def _keywords(builtin: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """Built-in keywords plus the environment's, lower-cased, order kept, no repeats."""
    merged = [k.lower() for k in builtin + extra]
    return tuple(dict.fromkeys(merged))


@dataclass(frozen=True)
class RoutingSettings:
    hard_code_keywords: tuple[str, ...] = HARD_CODE_KEYWORDS
    hard_code_min_hits: int = 1
    long_answer_keywords: tuple[str, ...] = LONG_ANSWER_KEYWORDS
    long_answer_min_hits: int = 1
    long_answer_enabled: bool = True
    code_keywords: tuple[str, ...] = CODE_KEYWORDS
    max_new_tokens: int = 32
    max_new_tokens_code_soft: int = 64
    max_new_tokens_code: int = 192
    max_new_tokens_code_hard: int = 192
    disabled: bool = False
    log_routing: bool = False


def load_routing(environ: Mapping[str, str]) -> RoutingSettings:
    env = Env(environ)
    code = env.int("MAX_NEW_TOKENS_CODE", 192, 1, MAX_NEW_TOKENS_LIMIT)
    return RoutingSettings(
        hard_code_keywords=_keywords(HARD_CODE_KEYWORDS, env.csv("HARD_CODE_QUESTION_KEYWORDS")),
        hard_code_min_hits=env.int("HARD_CODE_MIN_HITS", 1, 1, 5),
        long_answer_keywords=_keywords(LONG_ANSWER_KEYWORDS, env.csv("LONG_ANSWER_KEYWORDS")),
        long_answer_min_hits=env.int("LONG_ANSWER_MIN_HITS", 1, 1, 5),
        long_answer_enabled=env.bool("LONG_ANSWER_ENABLE_DEFAULT", True),
        code_keywords=_keywords(CODE_KEYWORDS, env.csv("CODE_QUESTION_KEYWORDS")),
        max_new_tokens=env.int("MAX_NEW_TOKENS", 32, 1, MAX_NEW_TOKENS_LIMIT),
        max_new_tokens_code_soft=env.int("MAX_NEW_TOKENS_CODE_SOFT", 64, 1, MAX_NEW_TOKENS_LIMIT),
        max_new_tokens_code=code,
        max_new_tokens_code_hard=env.int("MAX_NEW_TOKENS_CODE_HARD", code, 1, MAX_NEW_TOKENS_LIMIT),
        disabled=env.bool("DISABLE_TOKEN_ROUTING", False),
        log_routing=env.bool("LOG_TOKEN_ROUTING", False),
    )


@dataclass(frozen=True)
class CleanupSettings:
    trim_examples: bool = True
    max_sentences: int = 6


def load_cleanup(environ: Mapping[str, str]) -> CleanupSettings:
    env = Env(environ)
    return CleanupSettings(
        trim_examples=env.bool("OUTPUT_TRIM_EXAMPLES", True),
        max_sentences=env.int("OUTPUT_MAX_SENTENCES", 6, 1, 12),
    )


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 1
    repetition_penalty: float = 1.05
    frequency_penalty: float = 0.1
    presence_penalty: float = 0.0  # no variable sets it: only a request does
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS


def load_sampling(environ: Mapping[str, str]) -> SamplingDefaults:
    env = Env(environ)
    stops = env.csv("STOP_STRINGS") or DEFAULT_STOP_STRINGS
    if env.bool("STOP_ON_DOUBLE_NEWLINE", False):
        stops = stops + ("\n\n",)
    top_k = env.int("TOP_K", 1)
    if top_k == 0 or top_k < -1:
        raise SettingsError(f"TOP_K={top_k} must be -1 (off) or at least 1")
    top_p = env.float("TOP_P", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise SettingsError(f"TOP_P={top_p} must be in (0, 1]")
    return SamplingDefaults(
        temperature=env.float("TEMPERATURE", 0.0, 0.0),
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=env.float("REPETITION_PENALTY", 1.05, 0.01, 2.0),
        frequency_penalty=env.float("FREQUENCY_PENALTY", 0.1, -2.0, 2.0),
        stop_strings=tuple(dict.fromkeys(stops)),
    )


@dataclass(frozen=True)
class ChatSettings:
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    fast_chat_template: bool = False
    # /v1 chat: thinking as `reasoning_content`, split by vLLM's reasoning parser of this name
    # (as `vllm serve --reasoning-parser`); auto: one for a tokenizer with both thinking tags
    # as tokens (preprocess.reasoning.parser_name); none: never.
    reasoning_parser: str = "auto"


def batch_mode(environ: Mapping[str, str] | None = None) -> bool:
    """BATCH_MODE, read at each call: the health answer must follow the live environment."""
    return Env(os.environ if environ is None else environ).bool("BATCH_MODE", False)


def validate_system_prompt(text: str) -> str:
    """Stripped system prompt; too long is refused, never silently cut."""
    text = text.strip()
    if len(text) > SYSTEM_PROMPT_MAX_CHARS:
        raise ValueError(f"system_prompt has {len(text)} characters; the limit is {SYSTEM_PROMPT_MAX_CHARS}")
    return text


def load_chat(environ: Mapping[str, str]) -> ChatSettings:
    env = Env(environ)
    try:
        system_prompt = validate_system_prompt(env.str("SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT))
    except ValueError as exc:
        raise SettingsError(f"SYSTEM_PROMPT: {exc}") from None
    return ChatSettings(
        system_prompt=system_prompt,
        fast_chat_template=env.bool("FAST_CHAT_TEMPLATE", batch_mode(environ)),
        reasoning_parser=env.str("REASONING_PARSER", "auto"),
    )


@dataclass(frozen=True)
class GrammarSettings:
    """The sandboxed compile of each response format (preprocess.grammar.sandbox)."""
    check_memory_mb: int = 1024
    check_timeout_s: float = 5.0


def load_grammar(environ: Mapping[str, str]) -> GrammarSettings:
    env = Env(environ)
    return GrammarSettings(check_memory_mb=env.int("GRAMMAR_CHECK_MEMORY_MB", 1024, 64, 65536),
                           check_timeout_s=env.float("GRAMMAR_CHECK_TIMEOUT_S", 5.0, 0.1, 600.0))


WARMUP_NUM_SAMPLES_CAP_MAX = 8192
WARMUP_REPEAT_MAX = 8


@dataclass(frozen=True)
class WarmupSettings:
    prompt: str = "你好"
    data_path: Path = Path("./data.jsonl")
    num_samples: int = 64
    num_samples_cap: int = 512  # WARMUP_NUM_SAMPLES is clipped to this
    repeat: int = 1


def load_warmup(environ: Mapping[str, str]) -> WarmupSettings:
    env = Env(environ)
    default = WarmupSettings()
    cap = env.int("WARMUP_NUM_SAMPLES_CAP", default.num_samples_cap, 0, WARMUP_NUM_SAMPLES_CAP_MAX)
    return WarmupSettings(
        prompt=env.str("WARMUP_PROMPT", default.prompt),
        data_path=Path(env.str("WARMUP_DATA_PATH", str(default.data_path))),
        num_samples=env.int("WARMUP_NUM_SAMPLES", default.num_samples, 0, cap),
        num_samples_cap=cap,
        repeat=env.int("WARMUP_REPEAT", default.repeat, 1, WARMUP_REPEAT_MAX),
    )


@dataclass(frozen=True)
class ShimSettings:
    host: str = "0.0.0.0"
    port: int = 8000
    triton_host: str = "127.0.0.1"
    triton_metrics_host: str = "127.0.0.1"  # TRITON_METRICS_ADDRESS: 0.0.0.0 for a Prometheus in the cluster
    triton_http_port: int = 8010
    triton_grpc_port: int = 8011
    triton_metrics_port: int = 8012
    admin_token: str | None = field(default=None, repr=False)
    api_key: str | None = field(default=None, repr=False)  # SHIM_API_KEY: what /v1 requires, as vllm serve --api-key
    sse_keepalive_s: float = 15.0  # a comment line on a stream that has been silent this long
    tool_call_parser: str = "hermes"  # vLLM's tool parser for tool_choice "auto" (the model family's)
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_prompts: int = 4096
    max_request_tokens: int = 1_048_576  # prompt tokens + choices x max new tokens, per request
    max_queued_tokens: int = 4 * 1_048_576  # the same, over every request admitted and not yet answered
    request_timeout_s: float = 600.0
    header_timeout_s: float = 10.0  # the whole request head must arrive within this
    body_timeout_s: float = 30.0  # and the whole body within this
    drain_s: float = 30.0  # on SIGTERM, how long requests in flight may take to finish
    max_header_bytes: int = 64 * 1024
    triton_home: Path | None = None  # a tritonserver install (bin/, backends/); None: pytriton's
    # TRITON_URL: a Triton the shim did not start (host:port of its HTTP endpoint); the shim
    # then attaches to it instead of launching and supervising its own.
    triton_url: str | None = None
    # TRITON_GRPC_URL: that Triton's gRPC endpoint (streamed answers); by default the
    # TRITON_URL host on Triton's default gRPC port, 8001.
    triton_grpc_url: str | None = None

    @property
    def triton_endpoint(self) -> str:
        """host:port of Triton's HTTP endpoint, for tritonclient."""
        return self.triton_url or f"{self.triton_host}:{self.triton_http_port}"

    @property
    def triton_grpc_endpoint(self) -> str:
        """host:port of Triton's gRPC endpoint, where `llm_stream` is reached."""
        if self.triton_grpc_url:
            return self.triton_grpc_url
        if self.triton_url:
            return f"{self.triton_url.rpartition(':')[0]}:8001"
        return f"{self.triton_host}:{self.triton_grpc_port}"


def parse_triton_url(value: str | None, name: str = "TRITON_URL", scheme: str = "http") -> str | None:
    """`scheme://host:port` or `host:port` (a trailing slash is dropped) to host:port."""
    if value is None or not value.strip():
        return None
    text = value.strip().rstrip("/")
    if "://" in text:
        given, text = text.split("://", 1)
        if given != scheme:
            raise SettingsError(f"{name}={value!r}: only {scheme}:// is supported (Triton's {scheme} endpoint)")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535 or "/" in text:
        raise SettingsError(f"{name}={value!r} is not host:port or {scheme}://host:port")
    return text


def load_shim(environ: Mapping[str, str]) -> ShimSettings:
    env = Env(environ)
    return ShimSettings(
        host=env.str("HOST", "0.0.0.0"),
        port=env.int("PORT", 8000, 1, 65535),
        triton_host=env.str("TRITON_BIND_ADDRESS", "127.0.0.1"),
        triton_metrics_host=env.str("TRITON_METRICS_ADDRESS", env.str("TRITON_BIND_ADDRESS", "127.0.0.1")),
        triton_http_port=env.int("TRITON_HTTP_PORT", 8010, 1, 65535),
        triton_grpc_port=env.int("TRITON_GRPC_PORT", 8011, 1, 65535),
        triton_metrics_port=env.int("TRITON_METRICS_PORT", 8012, 1, 65535),
        admin_token=env.raw("SHIM_ADMIN_TOKEN"),
        api_key=env.raw("SHIM_API_KEY"),
        sse_keepalive_s=env.float("SHIM_SSE_KEEPALIVE_S", 15.0, 0.1, 600.0),
        tool_call_parser=env.str("TOOL_CALL_PARSER", "hermes"),
        max_body_bytes=env.int("SHIM_MAX_BODY_BYTES", 8 * 1024 * 1024, 1024),
        max_batch_prompts=env.int("SHIM_MAX_BATCH_PROMPTS", 4096, 1),
        max_request_tokens=env.int("SHIM_MAX_REQUEST_TOKENS", 1_048_576, 1),
        max_queued_tokens=env.int("SHIM_MAX_QUEUED_TOKENS", 4 * 1_048_576, 1),
        header_timeout_s=env.float("SHIM_HEADER_TIMEOUT_S", 10.0, 0.1),
        body_timeout_s=env.float("SHIM_BODY_TIMEOUT_S", 30.0, 0.1),
        drain_s=env.float("SHIM_DRAIN_S", 30.0, 0.0, 3600.0),
        max_header_bytes=env.int("SHIM_MAX_HEADER_BYTES", 64 * 1024, 1024),
        request_timeout_s=env.float("SHIM_REQUEST_TIMEOUT_S", 600.0, 1.0),
        triton_home=Path(home) if (home := env.raw("TRITON_HOME")) else None,
        triton_url=parse_triton_url(env.raw("TRITON_URL")),
        triton_grpc_url=parse_triton_url(env.raw("TRITON_GRPC_URL"), "TRITON_GRPC_URL", "grpc"),
    )


def resolve_model_dir(environ: Mapping[str, str], cwd: Path | None = None) -> Path:
    """MODEL_DIR, else ./model/$MODEL_ID, else ./merged when only that exists (absolute)."""
    env = Env(environ)
    base = Path.cwd() if cwd is None else cwd
    explicit = env.raw("MODEL_DIR")
    if explicit is not None:
        return (base / explicit).resolve()
    default = (base / "model" / env.str("MODEL_ID", EMBEDDED_MODEL_ID)).resolve()
    merged = (base / "merged").resolve()
    if not default.exists() and merged.exists():
        return merged
    return default


def runtime_dir(environ: Mapping[str, str]) -> Path | None:
    """LLM_RUNTIME_DIR: where the generator publishes its state for the shim (set by serve)."""
    value = Env(environ).raw("LLM_RUNTIME_DIR")
    return Path(value) if value else None


# Shown by GET /info. An allow-list: nothing else from the environment is ever echoed,
# and a name that looks like a credential is dropped even if someone adds it here.
PUBLIC_VARIABLES = (
    "MODEL_ID", "MODEL_DIR", "BATCH_MODE", "SYSTEM_PROMPT", "FAST_CHAT_TEMPLATE",
    "MAX_NEW_TOKENS", "MAX_NEW_TOKENS_CODE", "MAX_NEW_TOKENS_CODE_SOFT", "MAX_NEW_TOKENS_CODE_HARD",
    "DISABLE_TOKEN_ROUTING", "LOG_TOKEN_ROUTING", "CODE_QUESTION_KEYWORDS", "HARD_CODE_QUESTION_KEYWORDS",
    "HARD_CODE_MIN_HITS", "LONG_ANSWER_KEYWORDS", "LONG_ANSWER_MIN_HITS", "LONG_ANSWER_ENABLE_DEFAULT",
    "OUTPUT_TRIM_EXAMPLES", "OUTPUT_MAX_SENTENCES", "TEMPERATURE", "TOP_P", "TOP_K", "REPETITION_PENALTY",
    "FREQUENCY_PENALTY", "STOP_STRINGS", "STOP_ON_DOUBLE_NEWLINE", "WARMUP_PROMPT", "WARMUP_DATA_PATH",
    "WARMUP_NUM_SAMPLES", "WARMUP_NUM_SAMPLES_CAP", "WARMUP_REPEAT", "USE_VLLM", "FORCE_VLLM",
    "ALLOW_UNSUPPORTED_VLLM",    "SERVE_VLLM_ENGINE", "GPU_MEMORY_UTILIZATION", "DTYPE", "MAX_MODEL_LEN", "DEFAULT_MAX_MODEL_LEN",
    "VLLM_QUANTIZATION", "VLLM_LOAD_FORMAT", "VLLM_KV_CACHE_DTYPE", "KV_CACHE_DTYPE", "VLLM_ATTENTION_BACKEND",
    "ENABLE_PREFIX_CACHING",
    "VLLM_MAX_NUM_SEQS", "VLLM_MAX_NUM_BATCHED_TOKENS", "VLLM_TOKENIZER_POOL_SIZE", "VLLM_TOKENIZER_POOL_TYPE",
    "TENSOR_PARALLEL_SIZE", "VLLM_ENFORCE_EAGER", "ENABLE_CHUNKED_PREFILL", "VLLM_COMPILATION_CONFIG",
    "ENABLE_SPECULATIVE_DECODING", "SPEC_METHOD", "SPEC_NUM_SPECULATIVE_TOKENS", "SPEC_NGRAM_LOOKUP_MAX",
    "SPEC_NGRAM_LOOKUP_MIN", "SPEC_DRAFT_MODEL_DIR", "SPEC_DRAFT_MAX_MODEL_LEN", "SPEC_DISABLE_BY_BATCH_SIZE",
    "VLLM_LOG_LEVEL", "VLLM_SCHEDULER_DEFAULTS", "VLLM_ASYNC_SCHEDULING", "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE",
    "VLLM_STREAM_INTERVAL",
    "VLLM_USE_V1", "VLLM_PLUGINS", "CUDA_VISIBLE_DEVICES", "VLLM_CPU_KVCACHE_SPACE",
    "PORT", "TRITON_HTTP_PORT", "TRITON_GRPC_PORT", "TRITON_METRICS_PORT", "SHIM_MAX_BODY_BYTES",
    "SHIM_MAX_BATCH_PROMPTS", "SHIM_MAX_REQUEST_TOKENS", "SHIM_MAX_QUEUED_TOKENS", "SHIM_DRAIN_S",
    "GRAMMAR_CHECK_MEMORY_MB", "GRAMMAR_CHECK_TIMEOUT_S", "SHIM_REQUEST_TIMEOUT_S", "SHIM_HEADER_TIMEOUT_S",
    "SHIM_BODY_TIMEOUT_S", "SHIM_MAX_HEADER_BYTES", "TRITON_HOME", "TRITON_URL", "DATA_PARALLEL_SIZE",
    "TRITON_BIND_ADDRESS", "TRITON_METRICS_ADDRESS", "VLLM_ENGINE_STATS", "ENGINE_FRONTEND",
    "VLLM_FAST_PENALTIES", "ENGINE_RESUBMIT_S", "SHIM_SSE_KEEPALIVE_S",
    "TOOL_CALL_PARSER", "REASONING_PARSER",
)
_SECRET_WORDS = frozenset({"TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "CREDENTIALS", "APIKEY"})


def looks_secret(name: str) -> bool:
    """HF_TOKEN, OPENAI_API_KEY, MY_SECRET... (MAX_NEW_TOKENS is not: words, not substrings)."""
    return any(word in _SECRET_WORDS for word in name.upper().split("_"))


def public_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {name: environ[name] for name in PUBLIC_VARIABLES if name in environ and not looks_secret(name)}


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one process, built once by `load`."""
    routing: RoutingSettings
    cleanup: CleanupSettings
    sampling: SamplingDefaults
    chat: ChatSettings
    warmup: WarmupSettings
    shim: ShimSettings
    engine: EngineSettings
    model_dir: Path
    runtime_dir: Path | None  # LLM_RUNTIME_DIR: where generator and shim meet (preprocess.runtime)
    public_environment: Mapping[str, str]  # what GET /info may show
    grammar: GrammarSettings = GrammarSettings()

    @property
    def largest_token_limit(self) -> int:
        """The routing limit a request without its own limit may reach."""
        r = self.routing
        return max(r.max_new_tokens, r.max_new_tokens_code_soft, r.max_new_tokens_code, r.max_new_tokens_code_hard)


def load(environ: Mapping[str, str] | None = None, *, cwd: Path | None = None, metax: bool | None = None,
         cpu_only: bool = False) -> Settings:
    """Every section parsed, so a malformed variable stops start-up with one line.

    The engine section depends on the device: `metax` (None: look for MetaX devices) and
    `cpu_only` change a few defaults (see `load_engine`). Only the generator builds an
    engine and knows its device; elsewhere the engine section is parsed to validate it.
    """
    environ = os.environ if environ is None else environ
    return Settings(
        routing=load_routing(environ),
        cleanup=load_cleanup(environ),
        sampling=load_sampling(environ),
        chat=load_chat(environ),
        warmup=load_warmup(environ),
        shim=load_shim(environ),
        engine=load_engine(environ, metax=metax, cpu_only=cpu_only),
        model_dir=resolve_model_dir(environ, cwd),
        runtime_dir=runtime_dir(environ),
        public_environment=MappingProxyType(public_environment(environ)),
        grammar=load_grammar(environ),
    )
