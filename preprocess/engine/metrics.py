"""The generator's custom metrics, on Triton's own metrics port.

`pb_utils` is passed in (this package never imports Triton). Figures:
prompts and engine submissions (a batch of N prompts with one sampling setting is one
submission), prompt/generated tokens, requests per token-limit bucket, time to first token
and end-to-end latency, KV-cache blocks in use and in total, the concurrency the cache
can hold at the current average request length (blocks x block size / average tokens), and
vLLM's own per-request phases on its engine's clock (queue, prefill, decode), as running sums.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from .generation import GenerationItem, GenerationResult

log = logging.getLogger("preprocess.engine.metrics")

SCHEDULER_FIGURES_S = 0.5  # how often the scheduler's figures are sent (each is a round trip)
LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


# What a replica's engine keeps as running totals (KvCacheGauge.totals), each sent as a counter.
ENGINE_TOTALS = ("engine_tokens", "engine_requests", "engine_queue_s", "engine_prefill_s", "engine_decode_s")


class KvCacheGauge:
    """The engine's latest scheduler figures, fed by a vLLM stat logger (vLLM's own
    numbers): KV-cache usage, and the requests running and waiting in its scheduler."""

    def __init__(self):
        self.usage = 0.0
        self.total_blocks = 0
        self.block_size = 0
        self.running = 0
        self.waiting = 0
        # Running sums since this engine started, by ENGINE_TOTALS family: vLLM's token count,
        # step by step (aborted requests' tokens included), and its finished requests' phases
        # (vLLM's FinishedRequestStats, timed by the engine core: what `vllm serve` exports as
        # vllm:request_queue_time_seconds, ..._prefill_..., ..._decode_...).
        self.totals = dict.fromkeys(ENGINE_TOTALS, 0.0)
        self.recorded = False  # whether vLLM has reported at all (not with VLLM_ENGINE_STATS=0)

    @property
    def generation_tokens(self) -> int:
        return int(self.totals["engine_tokens"])

    def figures(self) -> tuple:
        """Everything above, as one message (a replica's child process sends it to the stub)."""
        return (self.usage, self.total_blocks, self.block_size, self.running, self.waiting,
                tuple(self.totals[name] for name in ENGINE_TOTALS), self.recorded)

    def load_figures(self, figures: tuple) -> None:
        (self.usage, self.total_blocks, self.block_size, self.running, self.waiting, totals, self.recorded) = figures
        self.totals = dict(zip(ENGINE_TOTALS, totals))

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
                    gauge.running = int(getattr(scheduler_stats, "num_running_reqs", 0))
                    gauge.waiting = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
                    gauge.recorded = True
                if iteration_stats is not None:
                    totals = gauge.totals
                    totals["engine_tokens"] += int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
                    for finished in getattr(iteration_stats, "finished_requests", None) or ():
                        totals["engine_requests"] += 1
                        totals["engine_queue_s"] += max(0.0, float(getattr(finished, "queued_time", 0.0)))
                        totals["engine_prefill_s"] += max(0.0, float(getattr(finished, "prefill_time", 0.0)))
                        totals["engine_decode_s"] += max(0.0, float(getattr(finished, "decode_time", 0.0)))

            def log_engine_initialized(self):
                pass

        return Recorder


def unscraped_prometheus_logger():
    """A stand-in for vLLM's own Prometheus recorder, which records nothing.

    vLLM records its Prometheus figures in the process that runs AsyncLLM, here the
    generator stub, where no endpoint serves them (ours are above, on Triton's port). vLLM
    adds that recorder unless it is given one, so it gets this one: recording figures that
    nobody scrapes cost the stub's one core a large share of its time under load (py-spy;
    docs/performance.md, "vLLM's per-step statistics")."""
    try:
        from vllm.v1.metrics.loggers import PrometheusStatLogger
    except ImportError:
        return None

    class Unscraped(PrometheusStatLogger):
        def __init__(self, vllm_config, engine_indexes=None, *args, **kwargs):
            pass  # no registry, no figures

        def record(self, *args, **kwargs):
            pass

        def record_sleep_state(self, *args, **kwargs):
            pass

        def record_admission_rejection(self, *args, **kwargs):
            pass

        def log(self):
            pass

        def log_engine_initialized(self):
            pass

    return Unscraped


def engine_stat_loggers(engine_stats: bool, kv_gauge: KvCacheGauge | None) -> list:
    """The stat loggers an engine gets: a silent stand-in for vLLM's Prometheus recorder,
    and the recorder of `kv_gauge`; none when VLLM_ENGINE_STATS=0 (a custom logger would
    turn vLLM's statistics back on)."""
    if not engine_stats:
        return []
    loggers = [unscraped_prometheus_logger(), kv_gauge.stat_logger_factory() if kv_gauge is not None else None]
    return [logger for logger in loggers if logger is not None]


@dataclass
class Tally:
    """What one round of queued events adds to one replica's figures."""
    prompts: int = 0
    submissions: int = 0
    buckets: Counter = field(default_factory=Counter)  # prompts by max_new_tokens
    answers: list[GenerationResult] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # ended streams by outcome


# The families every replica has its own labelled metric of, in ReplicaFigures' order.
REPLICA_FAMILIES = ("prompts", "submissions", "prompt_tokens", "generated_tokens", "kv_used", "kv_total",
                    "kv_concurrency", "engine_up", "waiting", "running", "kv_usage")


class ReplicaFigures:
    """One replica's metrics, each labelled replica="<index>", and its KV-cache gauge."""

    def __init__(self, families: dict, replica: int, histograms: bool):
        labels = {"replica": str(replica)}
        self.labels = labels
        self._families = families  # for the labelled metrics made on first use
        self.kv = KvCacheGauge()
        self.tokens_seen = 0
        self.requests_seen = 0
        (self.prompts, self.submissions, self.prompt_tokens, self.generated_tokens, self.kv_used, self.kv_total,
         self.kv_concurrency, self.engine_up, self.waiting, self.running, self.kv_usage) = (
            families[name].Metric(labels=labels) for name in REPLICA_FAMILIES)
        self.engine_totals = {name: families[name].Metric(labels=labels) for name in ENGINE_TOTALS}
        self.engine_totals_sent = dict.fromkeys(ENGINE_TOTALS, 0.0)
        self.scheduler_sent: tuple | None = None
        # Without vLLM's statistics (VLLM_ENGINE_STATS=0): () -> (prompts in flight, max_num_seqs)
        self.load = None
        self.ttft = families["ttft"].Metric(labels=labels, buckets=LATENCY_BUCKETS) if histograms else None
        self.e2e = families["e2e"].Metric(labels=labels, buckets=LATENCY_BUCKETS) if histograms else None
        self.buckets: dict[str, object] = {}  # by max_new_tokens
        self.streams: dict[str, object] = {}  # by outcome

    def apply(self, tally: Tally) -> None:
        """Sends what `tally` adds. Each figure is its own round trip to the server, so a
        scrape can fall between two; the order is the guarantee: the figure that says a
        request was counted comes after that request's other figures.
        - a submission: engine submissions and buckets, then prompts;
        - an answer: its tokens and the KV-cache figures, then time to first token, then
          end-to-end latency;
        - a stream's end: its answer (queued first, see stream_ended), then the outcome."""
        if tally.submissions:
            self.submissions.increment(tally.submissions)
        for limit, count in tally.buckets.items():
            self._labelled(self.buckets, "buckets", "max_new_tokens", str(limit)).increment(count)
        if tally.prompts:
            self.prompts.increment(tally.prompts)
        if tally.answers:
            prompt_tokens = sum(result.prompt_tokens for result in tally.answers)
            generated_tokens = sum(result.completion_tokens for result in tally.answers)
            self.requests_seen += len(tally.answers)
            self.tokens_seen += prompt_tokens + generated_tokens
            for metric, amount in ((self.prompt_tokens, prompt_tokens), (self.generated_tokens, generated_tokens)):
                if amount:
                    metric.increment(amount)
            self.update_kv()
            if self.ttft is not None and self.e2e is not None:
                for histogram, seconds in ((self.ttft, "ttft_s"), (self.e2e, "e2e_s")):
                    for value in (getattr(result, seconds) for result in tally.answers):
                        if value is not None:
                            histogram.observe(value)
        for outcome, count in tally.outcomes.items():
            self._labelled(self.streams, "streams", "outcome", outcome).increment(count)

    def _labelled(self, metrics: dict, family: str, label: str, value: str):
        """The Metric of `family` with this replica's labels plus `label`=`value`, made once."""
        if value not in metrics:
            metrics[value] = self._families[family].Metric(labels={**self.labels, label: value})
        return metrics[value]

    def update_scheduler(self) -> None:
        """vLLM's scheduler figures, sent when they changed. Without vLLM's statistics, the
        running and waiting counts follow from the prompts in flight and max_num_seqs (what
        the scheduler runs at once; a preemption for lack of KV cache is not seen then)."""
        kv, sent = self.kv, self.engine_totals_sent
        if any(kv.totals[name] < sent[name] for name in ENGINE_TOTALS):  # a rebuilt engine's child counts from 0
            sent.update(dict.fromkeys(ENGINE_TOTALS, 0.0))
        for name in ENGINE_TOTALS:  # each sum as its increase since the last send
            if (fresh := kv.totals[name] - sent[name]) > 0:
                self.engine_totals[name].increment(fresh)
                sent[name] = kv.totals[name]
        if kv.recorded:
            figures = (kv.waiting, kv.running, round(kv.usage, 4))
        elif self.load is not None:
            in_flight, max_seqs = self.load()
            figures = (max(0, in_flight - max_seqs), min(in_flight, max_seqs), None)
        else:
            return
        if figures == self.scheduler_sent:
            return
        self.scheduler_sent = figures
        self.waiting.set(figures[0])
        self.running.set(figures[1])
        if figures[2] is not None:
            self.kv_usage.set(figures[2])

    def update_kv(self) -> None:
        kv = self.kv
        if not kv.total_blocks:
            return
        self.kv_total.set(kv.total_blocks)
        self.kv_used.set(round(kv.usage * kv.total_blocks))
        if self.requests_seen:
            average = self.tokens_seen / self.requests_seen
            self.kv_concurrency.set(kv.total_blocks * kv.block_size / max(average, 1.0))


class GeneratorMetrics:
    """`submitted` and `finished` only enqueue; the "metrics" thread applies the figures.

    Every pb_utils metric call is a round trip to the Triton server process. Made on the
    engine's event-loop thread (where results arrive), seven of them per request stalled
    vLLM's output handling under concurrent load (py-spy, c=64). The thread also sums
    counters over whatever has queued up, so a busy second costs a few calls, not thousands.
    Every figure carries a `replica` label (one engine per replica; see placement.py).
    """

    def __init__(self, pb_utils, replicas: int = 1):
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._apply_events, name="metrics", daemon=True)
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        histogram = getattr(pb_utils.MetricFamily, "HISTOGRAM", None)
        described = {
            "prompts": ("llm_generator_prompts_total", counter, "Prompts received"),
            "submissions": ("llm_generator_engine_submissions_total", counter,
                            "Engine submissions: one per group of equal sampling settings"),
            "prompt_tokens": ("llm_generator_prompt_tokens_total", counter, "Prompt tokens"),
            "generated_tokens": ("llm_generator_generation_tokens_total", counter, "Generated tokens"),
            "buckets": ("llm_generator_requests_by_bucket_total", counter,
                        "Prompts per max_new_tokens bucket (the routing result)"),
            "kv_used": ("llm_generator_kv_cache_blocks_used", gauge, "KV-cache blocks in use"),
            "kv_total": ("llm_generator_kv_cache_blocks_total", gauge, "KV-cache blocks in total"),
            "kv_concurrency": ("llm_generator_kv_cache_concurrency", gauge,
                               "Requests the KV cache holds at the current average request length"),
            "engine_up": ("llm_generator_engine_up", gauge, "1 when the replica's engine serves, 0 while it restarts"),
            # vLLM's own names, which KEDA scalers and vLLM's production stack read (sent every SCHEDULER_FIGURES_S)
            "waiting": ("vllm:num_requests_waiting", gauge, "Requests waiting in vLLM's scheduler queue"),
            "running": ("vllm:num_requests_running", gauge, "Requests vLLM's scheduler runs"),
            "kv_usage": ("vllm:kv_cache_usage_perc", gauge, "KV-cache usage, 0 to 1"),
            "engine_tokens": ("vllm:generation_tokens_total", counter,
                              "Tokens vLLM generated, counted step by step (aborted requests' included)"),
            "engine_requests": ("llm_generator_engine_requests_finished_total", counter,
                                "Requests vLLM's engine finished (the count the engine_*_seconds sums are over)"),
            "engine_queue_s": ("llm_generator_engine_queue_seconds_total", counter,
                               "Seconds finished requests waited in vLLM's scheduler queue (engine core's clock)"),
            "engine_prefill_s": ("llm_generator_engine_prefill_seconds_total", counter,
                                 "Seconds finished requests spent from first scheduled to first token"),
            "engine_decode_s": ("llm_generator_engine_decode_seconds_total", counter,
                                "Seconds finished requests spent from first token to last token"),
            "streams": ("llm_generator_streams_total", counter,
                        "Streamed answers by outcome: finished, cancelled (aborted in vLLM) or failed"),
        }
        if histogram is not None:
            described["ttft"] = ("llm_generator_time_to_first_token_seconds", histogram, "Time to first token")
            described["e2e"] = ("llm_generator_e2e_latency_seconds", histogram, "Prompt arrival to last token")
        # A MetricFamily must outlive its Metric objects (close() drops the figures first).
        self._families = {key: pb_utils.MetricFamily(name=name, description=text, kind=kind)
                          for key, (name, kind, text) in described.items()}
        self._histograms = histogram is not None
        self._scheduler_sent_at = 0.0
        self._lock = threading.Lock()  # the metrics thread and the watchdog update; close() empties
        self._replicas: list[ReplicaFigures] = []
        self.add_replicas(replicas)
        self._thread.start()

    def add_replicas(self, count: int) -> None:
        """Figures for replicas 0..count-1 (those already there are kept)."""
        with self._lock:
            while len(self._replicas) < count:
                self._replicas.append(ReplicaFigures(self._families, len(self._replicas), self._histograms))

    def kv_gauge(self, replica: int) -> KvCacheGauge:
        return self._replicas[replica].kv

    def submitted(self, items: Sequence[GenerationItem], groups: int, replica: int = 0) -> None:
        self._events.put(("submitted", replica, ([item.sampling.max_tokens for item in items], groups)))

    def finished(self, results: Sequence[GenerationResult], replica: int = 0) -> None:
        self._events.put(("finished", replica, results))

    def stream_ended(self, outcome: str, result: GenerationResult, replica: int = 0) -> None:
        """A streamed answer ended ("finished", "cancelled" or "failed"); `result` has the
        tokens it generated, which count as any answer's do."""
        self._events.put(("finished", replica, [result]))
        self._events.put(("stream", replica, outcome))

    def _apply_events(self) -> None:
        while True:
            try:
                events = [self._events.get(timeout=SCHEDULER_FIGURES_S)]
            except queue.Empty:  # nothing happened: still send the scheduler's figures
                events = []
            while True:  # take everything queued meanwhile: one call per figure
                try:
                    events.append(self._events.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                if not self._replicas:  # closed
                    return
                try:
                    self._apply(events)
                except Exception as exc:  # a failed update must not end the figures for good
                    log.warning("could not update the metrics: %s", exc)
            if any(kind == "stop" for kind, _, _ in events):
                return

    def _apply(self, events: list) -> None:
        tallies: dict[int, Tally] = {}
        for kind, replica, payload in events:
            if kind == "stop":
                continue
            tally = tallies.setdefault(replica, Tally())
            if kind == "stream":
                tally.outcomes[payload] += 1
            elif kind == "submitted":
                limits, groups = payload
                tally.prompts += len(limits)
                tally.submissions += groups
                tally.buckets.update(limits)
            else:
                tally.answers.extend(payload)
        for replica, tally in tallies.items():
            self._replicas[replica].apply(tally)
        now = time.monotonic()
        if now - self._scheduler_sent_at >= SCHEDULER_FIGURES_S:
            self._scheduler_sent_at = now
            for figures in self._replicas:
                figures.update_scheduler()

    def set_load(self, replica: int, load) -> None:
        """`load() -> (prompts in flight, max_num_seqs)`: the running and waiting counts when
        vLLM reports no statistics."""
        with self._lock:
            if replica < len(self._replicas):
                self._replicas[replica].load = load

    def set_engine_up(self, up: bool, replica: int = 0) -> None:
        """Called from the watchdog thread: under the lock, as close() may be emptying the families."""
        with self._lock:
            if replica < len(self._replicas):
                self._replicas[replica].engine_up.set(1 if up else 0)

    def close(self) -> None:
        """Metrics first, families last: the stub crashes on a Metric outliving its family."""
        self._events.put(("stop", 0, None))  # wakes the thread; it applies what is queued
        self._thread.join(5)
        with self._lock:
            self._replicas.clear()
            self._families.clear()
