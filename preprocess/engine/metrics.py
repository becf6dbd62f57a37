"""The generator's custom metrics, on Triton's own metrics port.

`pb_utils` is passed in (this package never imports Triton). Figures:
prompts and engine submissions (a batch of N prompts with one sampling setting is one
submission), prompt/generated tokens, requests per token-limit bucket, time to first token
and end-to-end latency, KV-cache blocks in use and in total, and the concurrency the cache
can hold at the current average request length (blocks x block size / average tokens).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from typing import Sequence

from .generation import GenerationItem, GenerationResult

log = logging.getLogger("preprocess.engine.metrics")

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


class KvCacheGauge:
    """Latest KV-cache usage, fed by a vLLM stat logger (the engine's own figures)."""

    def __init__(self):
        self.usage = 0.0
        self.total_blocks = 0
        self.block_size = 0

    def stat_logger_factory(self):
        gauge = self

        try:
            from vllm.v1.metrics.loggers import StatLoggerBase
        except ImportError:
            return None

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                cache = vllm_config.cache_config
                gauge.block_size = int(cache.block_size or 0)
                gauge.total_blocks = int(getattr(cache, "num_gpu_blocks", 0) or 0)

            def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
                if scheduler_stats is not None:
                    gauge.usage = float(scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self):
                pass

        return Recorder


class GeneratorMetrics:
    """`submitted` and `finished` only enqueue; the "metrics" thread applies the figures.

    Every pb_utils metric call is a round trip to the Triton server process. Made on the
    engine's event-loop thread (where results arrive), seven of them per request stalled
    vLLM's output handling under concurrent load (py-spy, c=64). The thread also sums
    counters over whatever has queued up, so a busy second costs a few calls, not thousands.
    """

    def __init__(self, pb_utils, kv: KvCacheGauge | None = None):
        self._families = []  # a MetricFamily must outlive its Metric objects
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._apply_events, name="metrics", daemon=True)

        def family(name, kind, description):
            created = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(created)
            return created

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.kv = kv
        self._lock = threading.Lock()  # the metrics thread and the watchdog update; close() empties
        self._tokens_seen = 0
        self._requests_seen = 0
        self.prompts = family("llm_generator_prompts_total", counter, "Prompts received").Metric(labels={})
        self.submissions = family("llm_generator_engine_submissions_total", counter,
                                  "Engine submissions: one per group of equal sampling settings").Metric(labels={})
        self.prompt_tokens = family("llm_generator_prompt_tokens_total", counter, "Prompt tokens").Metric(labels={})
        self.generated_tokens = family("llm_generator_generation_tokens_total", counter, "Generated tokens").Metric(labels={})
        self._bucket_family = family("llm_generator_requests_by_bucket_total", counter,
                                     "Prompts per max_new_tokens bucket (the routing result)")
        self._buckets: dict[int, object] = {}
        self.kv_used = family("llm_generator_kv_cache_blocks_used", gauge, "KV-cache blocks in use").Metric(labels={})
        self.kv_total = family("llm_generator_kv_cache_blocks_total", gauge, "KV-cache blocks in total").Metric(labels={})
        self.kv_concurrency = family("llm_generator_kv_cache_concurrency", gauge,
                                     "Requests the KV cache holds at the current average request length").Metric(labels={})
        self.engine_up = family("llm_generator_engine_up", gauge, "1 when the engine serves, 0 while it restarts").Metric(labels={})
        histogram = getattr(pb_utils.MetricFamily, "HISTOGRAM", None)
        self.ttft = self.e2e = None
        if histogram is not None:
            self.ttft = family("llm_generator_time_to_first_token_seconds", histogram,
                               "Time to first token").Metric(labels={}, buckets=LATENCY_BUCKETS)
            self.e2e = family("llm_generator_e2e_latency_seconds", histogram,
                              "Prompt arrival to last token").Metric(labels={}, buckets=LATENCY_BUCKETS)
        self._thread.start()

    def submitted(self, items: Sequence[GenerationItem], groups: int) -> None:
        self._events.put(("submitted", [item.sampling.max_tokens for item in items], groups))

    def finished(self, results: Sequence[GenerationResult]) -> None:
        self._events.put(("finished", results, None))

    def _apply_events(self) -> None:
        while True:
            events = [self._events.get()]
            while True:  # take everything queued meanwhile: one call per figure
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                if self.prompts is None:  # closed
                    return
                try:
                    self._apply(events)
                except Exception as exc:  # a failed update must not end the figures for good
                    log.warning("could not update the metrics: %s", exc)
            if any(kind == "stop" for kind, _, _ in events):
                return

    def _apply(self, events: list) -> None:
        prompts = submissions = prompt_tokens = generated_tokens = 0
        buckets: Counter = Counter()
        finished_any = False
        for kind, payload, groups in events:
            if kind == "stop":
                continue
            if kind == "submitted":
                prompts += len(payload)
                submissions += groups
                buckets.update(payload)
                continue
            finished_any = True
            for result in payload:
                prompt_tokens += result.prompt_tokens
                generated_tokens += result.completion_tokens
                self._requests_seen += 1
                if self.ttft is not None and result.ttft_s is not None:
                    self.ttft.observe(result.ttft_s)
                if self.e2e is not None and result.e2e_s is not None:
                    self.e2e.observe(result.e2e_s)
        self._tokens_seen += prompt_tokens + generated_tokens
        for metric, amount in ((self.prompts, prompts), (self.submissions, submissions),
                               (self.prompt_tokens, prompt_tokens), (self.generated_tokens, generated_tokens)):
            if amount:
                metric.increment(amount)
        for limit, count in buckets.items():
            if limit not in self._buckets:
                self._buckets[limit] = self._bucket_family.Metric(labels={"max_new_tokens": str(limit)})
            self._buckets[limit].increment(count)
        if finished_any:
            self._update_kv()

    def _update_kv(self) -> None:
        if self.kv is None or not self.kv.total_blocks:
            return
        self.kv_total.set(self.kv.total_blocks)
        self.kv_used.set(round(self.kv.usage * self.kv.total_blocks))
        if self._requests_seen:
            average = self._tokens_seen / self._requests_seen
            self.kv_concurrency.set(self.kv.total_blocks * self.kv.block_size / max(average, 1.0))

    def set_engine_up(self, up: bool) -> None:
        """Called from the watchdog thread: under the lock, as close() may be emptying the families."""
        with self._lock:
            if self.engine_up is not None:
                self.engine_up.set(1 if up else 0)

    def close(self) -> None:
        """Metrics first, families last: the stub crashes on a Metric outliving its family."""
        self._events.put(("stop", None, None))  # wakes the thread; it applies what is queued
        self._thread.join(5)
        with self._lock:
            for name in ("prompts", "submissions", "prompt_tokens", "generated_tokens", "kv_used", "kv_total",
                         "kv_concurrency", "engine_up", "ttft", "e2e"):
                setattr(self, name, None)
            self._buckets.clear()
            self._families.clear()
