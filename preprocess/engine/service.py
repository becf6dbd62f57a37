"""The generator's backend choice and lifecycle, independent of Triton.

Chooses vLLM or transformers (USE_VLLM, FORCE_VLLM, the fallback chain), and when the
vLLM engine process dies it brings a new engine up in the background, failing requests
fast meanwhile, so the server recovers without a restart.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, MutableMapping, Sequence

from .. import settings as cfg
from ..contract import InvalidRequest
from ..runtime import GeneratorState
from ..tokenizer import load_tokenizer
from . import config as engine_config
from .fallback import EngineStartError
from .generation import (ENGINE_REFUSALS, BatchHandle, Completion, GenerationItem, PromptTooLong, Runner,
                         check_prompt_lengths)

log = logging.getLogger("generator")


class EngineUnavailable(RuntimeError):
    """The engine is down or restarting: the caller gets a 503 and may retry."""


# vLLM's own exception classes, named rather than imported: vLLM may be absent (transformers).
ENGINE_DEATHS = ("EngineDeadError",)  # the engine process is gone; the watchdog rebuilds it


def classify_error(exc: BaseException, engine_healthy: bool = True) -> str:
    """"invalid" (the request's fault: 4xx), "unavailable" (the engine is down or being
    rebuilt, or the request was cancelled: 503, retry) or "internal" (a bug: 5xx, which the
    shim counts toward restarting a dead server). A plain ValueError is internal: our own
    code raising it is a bug, not bad input."""
    if isinstance(exc, (InvalidRequest, PromptTooLong)) or type(exc).__name__ in ENGINE_REFUSALS:
        return "invalid"
    if (isinstance(exc, (EngineUnavailable, asyncio.CancelledError)) or type(exc).__name__ in ENGINE_DEATHS
            or not engine_healthy):
        return "unavailable"
    return "internal"


def stop_token_ids(tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """The tokenizer's eos plus the ids of the end markers that are single tokens."""
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        ids.append(eos)
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    for marker in ("<|im_end|>", "<|endoftext|>", *stop_strings):
        if marker in vocab:
            ids.append(vocab[marker])
    return list(dict.fromkeys(ids))


def text_stop_strings(tokenizer, stop_strings: Sequence[str], stop_ids: Sequence[int]) -> list[str]:
    """The stop strings vLLM must search the decoded text for. A special token among the stop
    ids never reaches the text (vLLM skips special tokens when decoding), so its string could
    never match: the id alone stops generation, and vLLM does one search less per token."""
    special = set(getattr(tokenizer, "all_special_tokens", None) or [])
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    by_id = set(stop_ids)
    return [s for s in stop_strings if not (s in special and vocab.get(s) in by_id)]


def model_max_len(model_dir: Path) -> int | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) else None


def accelerator_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def prepare_generator_process(environ: MutableMapping[str, str]) -> cfg.Settings:
    """Process set-up of the generator: the environment fixes vLLM needs, then the settings
    for this process's device. The fixes come first: a blank CUDA_VISIBLE_DEVICES would
    hide the GPU from the accelerator probe."""
    metax = engine_config.has_metax_device()
    for change in engine_config.prepare_process_environment(environ, metax):
        log.info("environment: %s", change)
    settings = cfg.load(environ, metax=metax, cpu_only=not accelerator_available())
    engine_config.set_vllm_log_level(settings.engine.vllm_log_level)
    return settings


class GeneratorService:
    # Rebuild attempts back off from the first delay, doubling, to the last: a restart that
    # keeps failing (FORCE_VLLM=1, out of memory) must not spin.
    retry_first_s = 0.5
    retry_max_s = 30.0

    def __init__(self, settings: cfg.Settings, metrics=None):
        self.model_dir = settings.model_dir
        self.state = GeneratorState(settings.runtime_dir)
        self.metrics = metrics  # preprocess.engine.metrics.GeneratorMetrics, or None outside Triton
        self.engine = settings.engine
        self.accelerator = not settings.engine.cpu_only
        self.sampling = settings.sampling
        self.tokenizer = load_tokenizer(self.model_dir)
        self.stop_token_ids = stop_token_ids(self.tokenizer, self.sampling.stop_strings)
        self.restarts = 0
        self.rebuild_delays: list[float] = []  # the back-off chosen after each failed rebuild
        self._restart_lock = threading.Lock()
        self._restarting = False
        self.runner: Runner = self._start_backend()
        self.publish_state()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._watchdog.start()

    def _start_backend(self) -> Runner:
        try:
            import vllm  # noqa: F401

            importable = True
        except Exception as exc:
            log.warning("vllm import failed: %s", exc)
            importable = False
        use, reason = engine_config.should_try_vllm(
            self.engine, importable, engine_config.has_c_compiler(), self.accelerator)
        if use:
            from .vllm_runner import VllmRunner

            kv = getattr(self.metrics, "kv", None)
            try:
                return self._hooked(VllmRunner(
                    self.engine, str(self.model_dir),
                    text_stop_strings(self.tokenizer, self.sampling.stop_strings, self.stop_token_ids),
                    self.stop_token_ids,
                    model_max_len(self.model_dir), stat_loggers=[kv.stat_logger_factory()] if kv else None))
            except EngineStartError as exc:
                if self.engine.force_vllm:
                    raise RuntimeError(f"FORCE_VLLM=1 and vLLM did not start: {exc}") from None
                log.warning("vLLM did not start (%s); falling back to transformers", exc)
        else:
            log.info("not using vLLM: %s", reason)
            if self.engine.force_vllm and self.engine.use_vllm != "false":
                raise RuntimeError(f"FORCE_VLLM=1 but vLLM cannot be used: {reason}")
        from .hf_runner import TransformersRunner

        return self._hooked(TransformersRunner(str(self.model_dir), self.tokenizer, self.sampling.stop_strings,
                                               self.stop_token_ids))

    def _hooked(self, runner: Runner) -> Runner:
        if self.metrics is not None:
            runner.on_submit = self.metrics.submitted
        return runner

    @property
    def ready(self) -> bool:
        return not self._restarting and self.runner.healthy

    def submit(self, items: Sequence[GenerationItem], on_done: Completion) -> BatchHandle | None:
        if not self.ready:
            on_done(EngineUnavailable("the generator engine is restarting; retry shortly"))
            return None
        try:
            check_prompt_lengths(items, self.runner.max_model_len)
        except PromptTooLong as exc:
            on_done(exc)
            return None
        return self.runner.submit(items, on_done)

    def cancel(self, handle: BatchHandle) -> None:
        self.runner.cancel(handle)

    def _watch(self) -> None:
        """Rebuild a dead engine (its process was killed) without a server restart. Until a
        rebuild succeeds the state says not ready, and attempts back off exponentially."""
        delay = self.retry_first_s
        while not self._stop.wait(0.5):
            if self.runner.healthy and not self._restarting:
                continue
            with self._restart_lock:
                if not self._restarting:
                    self._restarting = True
                    log.error("the %s engine died; starting a new one", self.runner.backend)
                    self.publish_state()
                    try:
                        self.runner.shutdown(timeout_s=5)
                    except Exception as exc:
                        log.warning("shutdown of the dead engine: %s", exc)
                started = time.monotonic()
                try:
                    self.runner = self._start_backend()
                except Exception as exc:
                    log.error("engine restart failed: %s; next attempt in %.1f s", exc, delay)
                    self.rebuild_delays.append(delay)
                    self._stop.wait(delay)
                    delay = min(self.retry_max_s, delay * 2)
                    continue
                self.restarts += 1
                self._restarting = False
                delay = self.retry_first_s
                log.info("engine back after %.1f s", time.monotonic() - started)
                self.publish_state()

    def publish_state(self) -> None:
        """Write info() where the shim reads it (GET /info, health)."""
        if self.metrics is not None:
            self.metrics.set_engine_up(self.ready)
        self.state.publish(self.info())

    def info(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "backend": self.runner.backend,
            "engine_mode": getattr(self.runner, "engine_class", type(self.runner)).__name__,
            "model_dir": str(self.model_dir),
            "engine_kwargs": getattr(self.runner, "engine_kwargs", {}),
            "scheduler": getattr(self.runner, "scheduler", {}),
            "max_model_len": getattr(self.runner, "max_model_len", None),
            "restarts": self.restarts,
            "pid": os.getpid(),
            "engine_pid": getattr(self.runner, "engine_pid", None),
        }

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.runner.shutdown(timeout_s)

