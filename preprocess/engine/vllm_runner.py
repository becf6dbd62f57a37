"""vLLM AsyncLLM on its own event-loop thread.

Triton calls `execute` on the stub's main thread; the engine lives on a separate asyncio
loop so vLLM keeps stepping while Triton hands us new requests and while responses go
out. Completion callbacks run on the loop thread and must only enqueue (the Triton
adapter sends responses from a third thread).

Every request is answered exactly once. A request's answer normally comes from its task's
end; when the loop stops first (the engine died and the replica is being rebuilt), the
tasks it still held will never run again, so `_stop_loop` answers them with
EngineUnavailable (a 503: retry) rather than leave their clients waiting.
"""
from __future__ import annotations

import asyncio
import gc
import math
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from ..engine_settings import EngineSettings
from .config import accepted_kwargs, check_attention_backend, engine_kwargs
from .fallback import build_with_fallbacks
from .generation import (ENGINE_REFUSALS, BatchHandle, Completion, EngineUnavailable, GenerationItem,
                         GenerationResult, StreamDelta, StreamListener, TokenLogprobs, group_by_sampling, new_batch_id)
from .penalties import ignored_fast_penalties, penalties_in_use
from .. import controls
from ..contract import NOT_SET, SAMPLING_NAMES, InvalidRequest
from ..sampling import SamplingSettings

log = logging.getLogger("generator.vllm")


def release_memory() -> None:
    """Free what a failed engine attempt held before the next one starts."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # torch missing or without CUDA: nothing to free
        pass


def usage_context(name: str):
    """vLLM's usage context for `SCHEDULER_DEFAULTS`: its batch-size defaults follow it.

    `offline` is what `LLM(...)` gets (on a GPU of 70 GiB or more: 1024 sequences, 16384
    batched tokens; on CPU 256 and 4096), `serve` what `vllm serve` and Triton's
    vllm_backend get (1024 and 8192), `engine` what a bare AsyncLLM gets (128 and 2048)."""
    from vllm.usage.usage_lib import UsageContext

    return {"offline": UsageContext.LLM_CLASS, "serve": UsageContext.OPENAI_API_SERVER,
            "engine": UsageContext.ENGINE_CONTEXT}.get(name)


def effective_scheduler(engine, defaults: str) -> dict[str, Any]:
    """The scheduler settings the engine really runs with, and the concurrency its KV cache holds."""
    config = getattr(engine, "vllm_config", None)
    if config is None:
        return {}
    scheduler, cache, compilation = config.scheduler_config, config.cache_config, config.compilation_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    block_size = getattr(cache, "block_size", None)
    max_len = config.model_config.max_model_len
    return {
        "defaults": defaults,
        "max_num_seqs": scheduler.max_num_seqs,
        "max_num_batched_tokens": scheduler.max_num_batched_tokens,
        "enable_chunked_prefill": getattr(scheduler, "enable_chunked_prefill", None),
        "async_scheduling": getattr(scheduler, "async_scheduling", None),
        "max_cudagraph_capture_size": getattr(compilation, "max_cudagraph_capture_size", None),
        "kv_cache_blocks": blocks,
        "block_size": block_size,
        # vLLM's own "maximum concurrency": how many max-length requests the cache holds at once
        "max_concurrency_at_max_len": round(blocks * block_size / max_len, 2) if blocks and block_size else None,
        "penalties": penalties_in_use(config),
    }


def compact_json_outputs() -> dict[str, Any]:
    """JSON answers (response_format) without free whitespace between tokens, as OpenAI's
    are: a grammar that allows any whitespace lets a model pad until max_tokens (measured
    with the random-weight test model: 64 tokens of blanks and no JSON). vLLM allows that
    only with a named backend; llguidance takes every JSON schema `auto` would."""
    try:
        from vllm.config import StructuredOutputsConfig

        return {"structured_outputs_config": StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)}
    except Exception as exc:  # an older vLLM, or no llguidance: vLLM's own default, never a failed start
        log.warning("structured outputs keep vLLM's defaults (%s)", exc)
        return {}


def finite_logprob(value: float | None) -> float:
    """-inf (a token the sampler ruled out) as -9999.0, as `vllm serve` does: JSON has no infinity."""
    return max(value, -9999.0) if value is not None and math.isfinite(value) else -9999.0


def token_logprobs(completion, top_n: int) -> list[TokenLogprobs]:
    """Per generated token: its text and logprob, and the `top_n` most likely tokens. vLLM
    gives a {token id: Logprob} per position: the top N by rank, plus the sampled token."""
    rows = []
    for token_id, candidates in zip(completion.token_ids, completion.logprobs or []):
        chosen = candidates.get(token_id)
        top = sorted((c for c in candidates.values() if c.rank is not None and c.rank <= top_n), key=lambda c: c.rank)
        rows.append((chosen.decoded_token or "" if chosen is not None else "",
                     finite_logprob(chosen.logprob if chosen is not None else None),
                     [(c.decoded_token or "", finite_logprob(c.logprob)) for c in top]))
    return rows


class VllmRunner:
    backend = "vllm"

    def __init__(self, settings: EngineSettings, model_dir: str, stop_strings: Sequence[str],
                 stop_token_ids: Sequence[int], model_max_len: int | None = None, stat_loggers=None):
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        self._SamplingParams = SamplingParams
        self._StructuredOutputsParams = StructuredOutputsParams
        self._TokensPrompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._delta = RequestOutputKind.DELTA
        self._stop_strings = list(stop_strings)
        self._stop_token_ids = list(stop_token_ids)
        self._params_cache: dict[SamplingSettings, Any] = {}
        self._unanswered: dict[str, Any] = {}  # batch id -> its one answer callback (`_answer_once`)
        self._unanswered_lock = threading.Lock()
        self.on_submit = None  # metrics hook: (items, number of sampling groups)
        self.engine_class = self._engine_class(settings.engine_mode)
        self.engine_mode = self.engine_class.__name__  # shown in /info

        check_attention_backend(settings.attention_backend)
        wanted = {**engine_kwargs(settings, model_dir), **compact_json_outputs()}
        kwargs, dropped = accepted_kwargs(wanted, AsyncEngineArgs.__init__)
        if dropped:
            log.info("this vLLM does not take %s; not passing them", ", ".join(dropped))
        self._stat_loggers = [f for f in (stat_loggers or []) if f is not None]
        self._usage_context = usage_context(settings.scheduler_defaults)

        def construct(attempt: dict[str, Any]):
            log.info("starting %s with %s (scheduler defaults: %s)", self.engine_class.__name__, attempt,
                     settings.scheduler_defaults)
            args = AsyncEngineArgs(**attempt)
            return self._call_on_loop(self._create(args), timeout=None)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._thread.start()
        started = time.monotonic()
        try:
            self.engine, self.engine_kwargs = build_with_fallbacks(
                construct, kwargs, metax=settings.metax, release=release_memory, model_max_len=model_max_len)
        except BaseException:
            self._stop_loop(timeout_s=5)  # a failed start leaves no thread behind
            raise
        self.max_model_len = int(self.engine.model_config.max_model_len)
        self.scheduler = effective_scheduler(self.engine, settings.scheduler_defaults)
        log.info("vLLM engine up in %.1f s: max_model_len=%d; scheduler %s", time.monotonic() - started,
                 self.max_model_len, self.scheduler)
        ignored = ignored_fast_penalties(settings.fast_penalties, getattr(self.engine, "vllm_config", None))
        if ignored:
            log.warning("%s", ignored)

    @staticmethod
    def _engine_class(mode: str):
        from vllm.v1.engine.async_llm import AsyncLLM

        if mode == "v0":
            try:
                from vllm.engine.async_llm_engine import AsyncLLMEngine

                if AsyncLLMEngine is not AsyncLLM:
                    return AsyncLLMEngine
            except ImportError:
                pass
            log.info("SERVE_VLLM_ENGINE=v0: this vLLM has only AsyncLLM (v1); using it")
        return AsyncLLM

    async def _create(self, args):
        # Built on the loop thread: AsyncLLM binds its output handler to the running loop.
        extra: dict[str, Any] = {}
        if self._stat_loggers:
            extra["stat_loggers"] = self._stat_loggers
        if self._usage_context is not None:
            extra["usage_context"] = self._usage_context
        return self.engine_class.from_engine_args(args, **extra)

    def _stop_loop(self, timeout_s: float) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_s)
            if not self._thread.is_alive():
                self._loop.close()
        with self._unanswered_lock:
            left = list(self._unanswered.values())
        if left:
            log.warning("the engine loop stopped with %d requests unanswered; answering them 503", len(left))
        for answer in left:  # one its task answers meanwhile is skipped: each runs once
            answer(EngineUnavailable("the generator engine stopped before answering; retry shortly"))

    def _answer_once(self, batch_id: str, deliver):
        """`deliver` wrapped to run at most once: from the request's task, or from
        `_stop_loop` for a task the stopped loop will never finish."""
        def answer(outcome) -> None:
            with self._unanswered_lock:
                if self._unanswered.pop(batch_id, None) is None:
                    return
            deliver(outcome)

        with self._unanswered_lock:
            self._unanswered[batch_id] = answer
        return answer

    def _answered(self, batch_id: str) -> None:
        """A stream that ended by itself: its pieces went out from its task."""
        with self._unanswered_lock:
            self._unanswered.pop(batch_id, None)

    def _call_on_loop(self, coroutine, timeout: float | None):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    @property
    def healthy(self) -> bool:
        return not getattr(self.engine, "errored", False)

    @property
    def engine_pid(self) -> int | None:
        """The EngineCore process id, for diagnostics and fault tests."""
        try:
            return self.engine.engine_core.resources.engine_manager.processes[0].pid
        except Exception:
            return None

    def sampling_params(self, sampling: SamplingSettings):
        """One SamplingParams per distinct settings, reused across requests (a seeded one
        too: vLLM seeds a fresh generator per request from it)."""
        params = self._params_cache.get(sampling)
        if params is None:
            structured = controls.structured_output_kwargs(sampling.response_format)
            params = self._SamplingParams(
                max_tokens=sampling.max_tokens,
                **{name: getattr(sampling, name) for name in SAMPLING_NAMES},  # vLLM's own names
                seed=None if sampling.seed == NOT_SET else sampling.seed,
                logprobs=None if sampling.top_logprobs == NOT_SET else sampling.top_logprobs,
                # ignore_eos means exactly max_tokens (benchmarks): vLLM would still stop at
                # the server's stop strings and stop ids, as the transformers backend does not.
                # The request's own stop strings always apply.
                stop=list(sampling.stop) if sampling.ignore_eos else self._stop_strings + list(sampling.stop),
                stop_token_ids=None if sampling.ignore_eos else self._stop_token_ids,
                structured_outputs=self._StructuredOutputsParams(**structured) if structured else None,
                output_kind=self._final_only,  # no per-token Python work: one output per request
                ignore_eos=sampling.ignore_eos,
            )
            if len(self._params_cache) < 4096:
                self._params_cache[sampling] = params
        return params

    def submit(self, items: Sequence[GenerationItem], on_done: Completion) -> BatchHandle:
        handle = BatchHandle(new_batch_id())
        answer = self._answer_once(handle.batch_id, on_done)
        return self._on_loop(self._generate_batch(items, handle), handle, answer, answer)

    def stream(self, item: GenerationItem, on_delta: StreamListener) -> BatchHandle:
        """Generate one answer, handing each new piece to `on_delta` (on the loop thread)
        as vLLM produces it; the last piece has its finish reason, or an error comes
        instead. `cancel(handle)` aborts it in vLLM."""
        handle = BatchHandle(new_batch_id())
        fail = self._answer_once(handle.batch_id, on_delta)
        return self._on_loop(self._stream_one(item, handle, on_delta), handle, fail,
                             lambda _: self._answered(handle.batch_id))

    def _on_loop(self, work, handle: BatchHandle, fail: Callable[[BaseException], None],
                 succeed: Callable[[Any], None]) -> BatchHandle:
        """Runs the coroutine `work` on the engine's loop; when it ends, `fail` gets a cancel
        or its exception, `succeed` its result (on the loop thread)."""
        future: Future = asyncio.run_coroutine_threadsafe(work, self._loop)

        def settled(done: Future) -> None:
            if done.cancelled():
                fail(asyncio.CancelledError("request cancelled"))
            elif done.exception() is not None:
                fail(done.exception())
            else:
                succeed(done.result())

        future.add_done_callback(settled)
        handle.future = future
        return handle

    async def _stream_one(self, item: GenerationItem, handle: BatchHandle, on_delta: StreamListener) -> None:
        params = self.sampling_params(item.sampling).clone()
        params.output_kind = self._delta  # each output carries only what is new
        request_id = f"{handle.batch_id}-s"
        if self.on_submit is not None:
            self.on_submit([item], 1)
        received = False
        try:
            async for output in self.engine.generate(self._TokensPrompt(prompt_token_ids=item.token_ids), params,
                                                     request_id):
                received = True
                completion = output.outputs[0]
                on_delta(StreamDelta(
                    text=completion.text, tokens=len(completion.token_ids), prompt_tokens=len(item.token_ids),
                    finish_reason=(completion.finish_reason or "stop") if output.finished else None,
                    logprobs=None if params.logprobs is None else token_logprobs(completion, params.logprobs),
                    token_ids=tuple(completion.token_ids)))
        except Exception as exc:
            raise self._refusal(exc, params, received) from None

    async def _generate_batch(self, items: Sequence[GenerationItem], handle: BatchHandle) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(items)
        tasks = []
        groups = group_by_sampling(items)
        if self.on_submit is not None:
            self.on_submit(items, len(groups))
        for sampling, indices in groups.items():
            params = self.sampling_params(sampling)
            for index in indices:
                request_id = f"{handle.batch_id}-{index}"
                tasks.append(asyncio.ensure_future(
                    self._generate_one(items[index].token_ids, params, request_id, results, index)))
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # One prompt failed or the batch was cancelled: stop the rest, answer the request once.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results  # type: ignore[return-value]

    async def _generate_one(self, token_ids, params, request_id, results, index) -> None:
        started = time.perf_counter()
        final = None
        try:
            async for output in self.engine.generate(self._TokensPrompt(prompt_token_ids=token_ids), params,
                                                     request_id):
                final = output
        except Exception as exc:
            raise self._refusal(exc, params, final is not None) from None
        completion = final.outputs[0]
        results[index] = GenerationResult(
            text=completion.text,
            prompt_tokens=len(final.prompt_token_ids or token_ids),
            completion_tokens=len(completion.token_ids),
            finish_reason=completion.finish_reason or "stop",
            ttft_s=getattr(getattr(final, "metrics", None), "first_token_latency", None) or None,
            e2e_s=time.perf_counter() - started,
            logprobs=None if params.logprobs is None else token_logprobs(completion, params.logprobs),
        )

    @staticmethod
    def _refusal(exc: Exception, params, produced: bool) -> Exception:
        """vLLM checks a structured-output spec (the schema, its grammar) before the request
        is queued: a failure there is the request's fault (InvalidRequest), not a bug."""
        if not produced and params.structured_outputs is not None and (
                isinstance(exc, ValueError) or type(exc).__name__ in ENGINE_REFUSALS):
            return InvalidRequest(f"response_format: {exc}")
        return exc

    def cancel(self, handle: BatchHandle) -> None:
        """Abort a batch (client gone): cancelling the tasks aborts their vLLM requests."""
        if handle.future is not None and not self._loop.is_closed():  # a closed loop answered it already
            handle.future.cancel()

    def shutdown(self, timeout_s: float) -> None:
        try:
            self.engine.shutdown()
        except Exception as exc:
            log.warning("engine shutdown: %s", exc)
        self._stop_loop(timeout_s)
