"""The keyword arguments the engine settings (preprocess.engine_settings) become, and the
process environment vLLM starts in.

An argument reaches `AsyncEngineArgs` only when the installed vLLM's signature accepts
it, so one vLLM build's extra argument never breaks another's start-up.
"""
from __future__ import annotations

import inspect
import logging
import os
import shutil
from typing import Any, Callable, Mapping, MutableMapping

from ..engine_settings import EngineSettings
from ..envparse import SettingsError

log = logging.getLogger("generator.config")

BLANK_DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "VLLM_DEVICE")


def has_c_compiler(which: Callable[[str], str | None] = shutil.which) -> bool:
    return any(which(cc) for cc in ("cc", "gcc", "clang"))


def prepare_process_environment(environ: MutableMapping[str, str], metax: bool) -> list[str]:
    """Start-up fixes of the process environment; returns what was changed, for the log.

    - blank device variables break torch/vLLM ("Device string must not be empty");
    - on MetaX, vLLM's V1 engine is the one that works (VLLM_USE_V1=1 unless set);
    - elsewhere, VLLM_PLUGINS="" keeps a stray platform plugin from breaking CUDA
      (`choose_vllm_plugins` may then name the generator's own).
    """
    changes = []
    for name in BLANK_DEVICE_VARIABLES:
        if name in environ and environ[name].strip() == "":
            del environ[name]
            changes.append(f"removed blank {name}")
    if metax and "VLLM_USE_V1" not in environ:
        environ["VLLM_USE_V1"] = "1"
        changes.append("VLLM_USE_V1=1 (MetaX)")
    if not metax and "VLLM_PLUGINS" not in environ:
        environ["VLLM_PLUGINS"] = ""
        changes.append('VLLM_PLUGINS="" (not MetaX)')
    if "VLLM_WORKER_MULTIPROC_METHOD" not in environ:
        # Measured on an H200 inside the Triton stub: with vLLM's default (fork) the engine
        # process died with "Cannot re-initialize CUDA in forked subprocess".
        environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        changes.append("VLLM_WORKER_MULTIPROC_METHOD=spawn")
    return changes


def choose_vllm_plugins(environ: MutableMapping[str, str], settings: "EngineSettings") -> list[str]:
    """vLLM loads the general plugins `VLLM_PLUGINS` names in every process it starts. Where
    the start-up fixes emptied it (not MetaX, not set by the user), it names the
    generator's penalties (`penalties.py`) when VLLM_FAST_PENALTIES is on."""
    from .penalties import PLUGIN_NAME

    if environ.get("VLLM_PLUGINS") != "" or not settings.fast_penalties or settings.metax:
        return []
    environ["VLLM_PLUGINS"] = PLUGIN_NAME
    return [f"VLLM_PLUGINS={PLUGIN_NAME}"]


# Engine arguments that only vLLM releases before the supported range take; passed when
# asked for, dropped by `accepted_kwargs` (with a log line) where this vLLM lacks them.
ENGINE_ARGUMENTS_OF_OLDER_VLLM = frozenset({"tokenizer_pool_size", "tokenizer_pool_type"})


def engine_kwargs(settings: EngineSettings, model_dir: str) -> dict[str, Any]:
    """Every argument the settings ask for, before the signature filter."""
    kwargs: dict[str, Any] = {
        "model": model_dir,
        "tokenizer": model_dir,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "dtype": settings.dtype,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "disable_log_stats": not settings.engine_stats,
        "enforce_eager": settings.enforce_eager,
        "stream_interval": settings.stream_interval,
    }
    optional = {
        "max_model_len": settings.max_model_len,
        "quantization": settings.quantization,
        "load_format": settings.load_format,
        "kv_cache_dtype": settings.kv_cache_dtype,
        "attention_backend": settings.attention_backend,
        "max_num_seqs": settings.max_num_seqs,
        "max_num_batched_tokens": settings.max_num_batched_tokens,
        "tokenizer_pool_size": settings.tokenizer_pool_size,
        "tokenizer_pool_type": settings.tokenizer_pool_type,
        "enable_chunked_prefill": settings.enable_chunked_prefill,
        "compilation_config": settings.compilation_config,
        "async_scheduling": settings.async_scheduling,
        "max_cudagraph_capture_size": settings.max_cudagraph_capture_size,
    }
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    if settings.speculative is not None:
        kwargs["speculative_config"] = settings.speculative.as_config()
        kwargs["enable_chunked_prefill"] = False  # vLLM's speculative path and chunked prefill conflict
    return kwargs


def check_attention_backend(name: str | None) -> None:
    """VLLM_ATTENTION_BACKEND is `auto` or one of this vLLM's attention backends. A wrong name
    stops start-up here with the valid ones: vLLM's own error is a bare KeyError, and the
    fallback chain would answer it with the transformers engine."""
    if not name or name.lower() == "auto":
        return
    try:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
    except ImportError:  # another vLLM layout: vLLM itself judges the name
        return
    if name.upper() not in AttentionBackendEnum.__members__:
        names = ", ".join(AttentionBackendEnum.__members__)
        raise SettingsError(f"VLLM_ATTENTION_BACKEND={name!r} is not an attention backend of this vLLM; "
                            f"one of: auto, {names}")


def accepted_kwargs(kwargs: Mapping[str, Any], target: Callable[..., Any]) -> tuple[dict[str, Any], list[str]]:
    """The arguments `target` accepts, and the names it does not (for the log)."""
    parameters = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return dict(kwargs), []
    kept = {k: v for k, v in kwargs.items() if k in parameters}
    return kept, sorted(set(kwargs) - set(kept))


def should_try_vllm(settings: EngineSettings, vllm_importable: bool, compiler: bool, accelerator: bool) -> tuple[bool, str]:
    """Whether to build a vLLM engine, with the reason for the log."""
    if settings.use_vllm == "false":
        return False, "USE_VLLM=false"
    if not vllm_importable:
        return False, "vllm is not importable"
    if not compiler and not settings.force_vllm:
        return False, "no C compiler (cc/gcc/clang) found; set FORCE_VLLM=1 to try anyway"
    if settings.use_vllm == "auto" and not accelerator:
        return False, "USE_VLLM=auto and no accelerator"
    return True, f"USE_VLLM={settings.use_vllm}"


def set_vllm_log_level(level: str) -> None:
    logging.getLogger("vllm").setLevel(level)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
