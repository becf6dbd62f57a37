"""GeneratorMetrics applies its figures exactly, from a recording stand-in for pb_utils.

Only the stub has the real `pb_utils`; this stand-in records what the generator asks of
it (the same calls: MetricFamily(...).Metric(labels=...), increment, set, observe). The
server tests scrape the same figures from a real Triton (tests/test_metrics.py).
"""
from __future__ import annotations

import pytest

from preprocess.engine.generation import GenerationItem, GenerationResult
from preprocess.engine.metrics import GeneratorMetrics
from preprocess.sampling import SamplingSettings
from tests.conftest import wait_for


class RecordedMetric:
    def __init__(self, family, labels):
        self.family, self.labels = family, labels
        self.value = 0.0
        self.observed: list[float] = []

    def increment(self, amount):
        if self.family.stub.broken:  # injected fault: the stub's link to the server failed
            raise RuntimeError("Failed to increment metric value")
        self.value += amount
        self.family.stub.calls.append((self.family.name, self.labels["replica"]))

    def set(self, value):
        self.value = value
        self.family.stub.calls.append((self.family.name, self.labels["replica"]))

    def observe(self, value):
        self.observed.append(value)
        self.family.stub.calls.append((self.family.name, self.labels["replica"]))


class RecordingPbUtils:
    """The slice of `triton_python_backend_utils` the metrics use."""

    def __init__(self):
        self.metrics: dict[tuple[str, tuple], RecordedMetric] = {}
        self.calls: list[tuple[str, str]] = []  # (family, replica) of each update, in order
        self.broken = False
        stub = self

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind):
                self.name, self.kind, self.stub = name, kind, stub

            def Metric(self, labels, buckets=None):  # noqa: N802 (pb_utils' name)
                metric = RecordedMetric(self, labels)
                stub.metrics[(self.name, tuple(sorted(labels.items())))] = metric
                return metric

        self.MetricFamily = MetricFamily

    def value(self, name, replica="0", **labels):
        return self.metrics[(name, tuple(sorted({"replica": replica, **labels}.items())))].value

    def observed(self, name, replica="0"):
        return self.metrics[(name, (("replica", replica),))].observed


def item(max_tokens):
    return GenerationItem([1, 2, 3], SamplingSettings(max_tokens, 0.0, 1.0, 1, 1.0, 0.0))


def result(prompt_tokens, completion_tokens, ttft=0.01, e2e=0.2):
    return GenerationResult("x", prompt_tokens, completion_tokens, ttft_s=ttft, e2e_s=e2e)


@pytest.fixture
def recorded():
    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils, replicas=2)
    kv = metrics.kv_gauge(0)
    kv.total_blocks, kv.block_size, kv.usage = 80, 16, 0.25
    yield pb_utils, metrics, kv
    metrics.close()


def test_counts_buckets_and_latencies_are_applied_exactly(recorded):
    pb_utils, metrics, _ = recorded
    metrics.submitted([item(32), item(32), item(192)], groups=2)
    metrics.finished([result(10, 5, ttft=0.02, e2e=0.3), result(7, 32)])
    metrics.finished([result(3, 1)])
    metrics.close()  # applies what is queued, then empties the families
    assert pb_utils.value("llm_generator_prompts_total") == 3
    assert pb_utils.value("llm_generator_engine_submissions_total") == 2
    assert pb_utils.value("llm_generator_prompt_tokens_total") == 20
    assert pb_utils.value("llm_generator_generation_tokens_total") == 38
    assert pb_utils.value("llm_generator_requests_by_bucket_total", max_new_tokens="32") == 2
    assert pb_utils.value("llm_generator_requests_by_bucket_total", max_new_tokens="192") == 1
    assert pb_utils.observed("llm_generator_time_to_first_token_seconds") == [0.02, 0.01, 0.01]
    assert pb_utils.observed("llm_generator_e2e_latency_seconds") == [0.3, 0.2, 0.2]


def test_a_requests_figures_come_before_the_one_that_says_it_was_counted(recorded):
    """Each figure is its own round trip to the server, so a scrape can fall between two:
    one that sees prompts counted sees their submissions and buckets, one that sees an
    answer's latency sees its tokens, one that sees a stream ended sees its tokens."""
    pb_utils, metrics, _ = recorded
    metrics.submitted([item(32), item(192)], groups=2)
    metrics.finished([result(10, 5), result(7, 32)])
    metrics.stream_ended("cancelled", result(9, 3))
    metrics.submitted([item(32)], groups=1, replica=1)
    metrics.stream_ended("finished", result(9, 4), replica=1)
    metrics.close()
    assert pb_utils.value("llm_generator_streams_total", outcome="cancelled") == 1
    assert pb_utils.value("llm_generator_streams_total", replica="1", outcome="finished") == 1
    assert [pb_utils.value("llm_generator_generation_tokens_total", replica=r) for r in "01"] == [40, 4]
    before = [("llm_generator_engine_submissions_total", "llm_generator_prompts_total"),
              ("llm_generator_requests_by_bucket_total", "llm_generator_prompts_total"),
              ("llm_generator_generation_tokens_total", "llm_generator_e2e_latency_seconds"),
              ("llm_generator_prompt_tokens_total", "llm_generator_e2e_latency_seconds"),
              ("llm_generator_time_to_first_token_seconds", "llm_generator_e2e_latency_seconds"),
              ("llm_generator_generation_tokens_total", "llm_generator_streams_total")]
    kv = ("llm_generator_kv_cache_blocks_used", "llm_generator_e2e_latency_seconds")  # replica 0 has a KV gauge
    for replica, pairs in (("0", [*before, kv]), ("1", before)):
        order = [name for name, r in pb_utils.calls if r == replica]
        for first, then in pairs:
            assert max(i for i, n in enumerate(order) if n == first) < \
                min(i for i, n in enumerate(order) if n == then), (replica, first, then, order)


@pytest.mark.parametrize("usage, used", [(0.0, 0), (0.25, 20), (1.0, 80), (0.999, 80), (0.006, 0)])
def test_kv_blocks_in_use_follow_the_engine_usage(recorded, usage, used):
    pb_utils, metrics, kv = recorded
    kv.usage = usage
    metrics.finished([result(10, 6)])
    metrics.close()
    assert pb_utils.value("llm_generator_kv_cache_blocks_used") == used
    assert pb_utils.value("llm_generator_kv_cache_blocks_total") == 80


def test_kv_concurrency_is_cache_tokens_over_the_mean_request_length(recorded):
    pb_utils, metrics, _ = recorded
    metrics.finished([result(100, 28), result(50, 78)])  # 256 tokens over 2 requests: 128 each
    metrics.close()
    assert pb_utils.value("llm_generator_kv_cache_concurrency") == pytest.approx(80 * 16 / 128)


def test_no_kv_figures_before_the_engine_reports_its_cache():
    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils)  # total_blocks 0: the engine has not reported its cache yet
    metrics.finished([result(1, 1)])
    metrics.close()
    assert pb_utils.value("llm_generator_kv_cache_blocks_total") == 0
    assert pb_utils.value("llm_generator_kv_cache_concurrency") == 0


def test_a_failed_update_does_not_end_the_figures(recorded, caplog):
    pb_utils, metrics, _ = recorded
    with caplog.at_level("WARNING"):
        pb_utils.broken = True
        metrics.submitted([item(8)], groups=1)
        wait_for(lambda: "could not update the metrics" in caplog.text, 60)  # the metrics thread met the fault
        assert "Failed to increment metric value" in caplog.text
        pb_utils.broken = False
        metrics.submitted([item(8), item(8)], groups=1)
        metrics.close()
    assert pb_utils.value("llm_generator_prompts_total") == 2  # the thread lived on
    assert pb_utils.value("llm_generator_engine_submissions_total") == 1


def test_engine_up_and_after_close_nothing_is_touched(recorded):
    pb_utils, metrics, _ = recorded
    metrics.set_engine_up(True)
    assert pb_utils.value("llm_generator_engine_up") == 1
    metrics.set_engine_up(False)
    assert pb_utils.value("llm_generator_engine_up") == 0
    metrics.close()
    metrics.set_engine_up(True)  # the watchdog may still call after close: a no-op
    assert pb_utils.value("llm_generator_engine_up") == 0


def test_each_replica_has_its_own_figures(recorded):
    """Every figure carries replica="<index>": one replica's work never shows on another's."""
    pb_utils, metrics, _ = recorded
    second = metrics.kv_gauge(1)
    second.total_blocks, second.block_size, second.usage = 40, 16, 0.5
    metrics.submitted([item(32)] * 3, groups=1, replica=0)
    metrics.submitted([item(32)] * 2, groups=1, replica=1)
    metrics.finished([result(10, 5)] * 3, replica=0)
    metrics.finished([result(4, 2)] * 2, replica=1)
    metrics.set_engine_up(True, replica=0)
    metrics.set_engine_up(False, replica=1)
    metrics.close()
    assert [pb_utils.value("llm_generator_prompts_total", replica=r) for r in "01"] == [3, 2]
    assert [pb_utils.value("llm_generator_generation_tokens_total", replica=r) for r in "01"] == [15, 4]
    assert [pb_utils.value("llm_generator_requests_by_bucket_total", replica=r, max_new_tokens="32")
            for r in "01"] == [3, 2]
    assert [pb_utils.value("llm_generator_kv_cache_blocks_used", replica=r) for r in "01"] == [20, 20]
    assert [pb_utils.value("llm_generator_kv_cache_blocks_total", replica=r) for r in "01"] == [80, 40]
    assert [pb_utils.value("llm_generator_engine_up", replica=r) for r in "01"] == [1, 0]
    assert len(pb_utils.observed("llm_generator_e2e_latency_seconds", replica="1")) == 2


def test_vllm_scheduler_figures_under_vllm_names_with_nothing_else_happening():
    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils, replicas=2)
    try:
        kv = metrics.kv_gauge(1)
        kv.waiting, kv.running, kv.usage, kv.recorded = 7, 256, 0.5, True  # what vLLM's stat logger records
        # No request event arrives: the metrics thread still sends them (bounded wait).
        assert wait_for(lambda: pb_utils.metrics.get(("vllm:num_requests_waiting", (("replica", "1"),)))
                        and pb_utils.value("vllm:num_requests_waiting", "1") == 7, 10)
        assert pb_utils.value("vllm:num_requests_running", "1") == 256
        assert pb_utils.value("vllm:kv_cache_usage_perc", "1") == 0.5
    finally:
        metrics.close()


def test_without_vllm_statistics_the_counts_follow_from_the_prompts_in_flight():
    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils, replicas=1)
    try:
        metrics.set_load(0, lambda: (300, 256))  # VLLM_ENGINE_STATS=0: vLLM reports nothing
        assert wait_for(lambda: pb_utils.value("vllm:num_requests_waiting") == 44, 10)
        assert pb_utils.value("vllm:num_requests_running") == 256
        metrics.set_load(0, lambda: (3, 256))
        assert wait_for(lambda: pb_utils.value("vllm:num_requests_waiting") == 0, 10)
        assert pb_utils.value("vllm:num_requests_running") == 3
    finally:
        metrics.close()


def test_vllm_generated_tokens_count_step_by_step_and_cross_the_process_boundary():
    """vLLM's per-step count (aborted requests' tokens included), sent as the increase since
    the last send; a replica's child process sends its gauge as one message the stub loads."""
    from types import SimpleNamespace

    from preprocess.engine.metrics import KvCacheGauge

    child = KvCacheGauge()
    recorder_class = child.stat_logger_factory()
    if recorder_class is None:
        pytest.fail("vLLM's StatLoggerBase moved: the engine's statistics are no longer recorded")
    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=80))
    recorder = recorder_class(config)
    scheduler = SimpleNamespace(kv_cache_usage=0.5, num_running_reqs=16, num_waiting_reqs=2)
    for tokens in (16, 16, 5):
        recorder.record(scheduler, SimpleNamespace(num_generation_tokens=tokens))
    assert child.generation_tokens == 37 and child.running == 16

    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils, replicas=1)
    try:
        metrics.kv_gauge(0).load_figures(child.figures())
        assert wait_for(lambda: pb_utils.metrics.get(("vllm:generation_tokens_total", (("replica", "0"),)))
                        and pb_utils.value("vllm:generation_tokens_total") == 37, 10)
        assert pb_utils.value("vllm:num_requests_running") == 16
        recorder.record(scheduler, SimpleNamespace(num_generation_tokens=3))
        metrics.kv_gauge(0).load_figures(child.figures())
        assert wait_for(lambda: pb_utils.value("vllm:generation_tokens_total") == 40, 10)
        # The replica's engine is rebuilt: its new child process counts from 0 again.
        reborn = KvCacheGauge()
        reborn_recorder = reborn.stat_logger_factory()(config)
        reborn_recorder.record(scheduler, SimpleNamespace(num_generation_tokens=5))
        metrics.kv_gauge(0).load_figures(reborn.figures())
        assert wait_for(lambda: pb_utils.value("vllm:generation_tokens_total") == 45, 10)
    finally:
        metrics.close()


def test_vllm_s_request_phases_are_summed_on_the_engine_s_clock_and_cross_the_process_boundary():
    """Each finished request's queue, prefill and decode seconds (vLLM's FinishedRequestStats)
    add to running sums beside a count of requests; the stub sends each sum's increase; a
    rebuilt engine's child starts its sums from 0 and the counters only grow."""
    from types import SimpleNamespace

    from preprocess.engine.metrics import KvCacheGauge

    def finished(queued, prefill, decode):
        return SimpleNamespace(queued_time=queued, prefill_time=prefill, decode_time=decode)

    config = SimpleNamespace(cache_config=SimpleNamespace(block_size=16, num_gpu_blocks=80))
    scheduler = SimpleNamespace(kv_cache_usage=0.1, num_running_reqs=1, num_waiting_reqs=0)
    child = KvCacheGauge()
    recorder = child.stat_logger_factory()(config)
    recorder.record(scheduler, SimpleNamespace(num_generation_tokens=4, finished_requests=[]))
    recorder.record(scheduler, SimpleNamespace(num_generation_tokens=2, finished_requests=[
        finished(0.5, 0.25, 2.0), finished(0.25, 0.125, 1.0)]))
    names = {"llm_generator_engine_requests_finished_total": 2, "llm_generator_engine_queue_seconds_total": 0.75,
             "llm_generator_engine_prefill_seconds_total": 0.375, "llm_generator_engine_decode_seconds_total": 3.0}
    pb_utils = RecordingPbUtils()
    metrics = GeneratorMetrics(pb_utils, replicas=1)
    try:
        metrics.kv_gauge(0).load_figures(child.figures())
        assert wait_for(lambda: all(pb_utils.metrics.get((name, (("replica", "0"),))) and pb_utils.value(name) == value
                                    for name, value in names.items()), 10), {n: pb_utils.value(n) for n in names}
        reborn = KvCacheGauge()
        reborn.stat_logger_factory()(config).record(scheduler, SimpleNamespace(
            num_generation_tokens=1, finished_requests=[finished(0.0, 0.5, 4.0)]))
        metrics.kv_gauge(0).load_figures(reborn.figures())
        assert wait_for(lambda: pb_utils.value("llm_generator_engine_decode_seconds_total") == 7.0
                        and pb_utils.value("llm_generator_engine_requests_finished_total") == 3, 10)
        assert pb_utils.value("llm_generator_engine_queue_seconds_total") == 0.75
    finally:
        metrics.close()
