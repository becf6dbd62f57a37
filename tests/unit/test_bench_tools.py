"""The benchmarks' own parsing: what they record must be what the GPU and the command line said."""
import shutil

import pytest

from tests.bench.cpu import latencies_ms
from tests.bench.clients import VLLM_SERVE_ENGINE_SERIES, engine_latency, stage_times
from tests.bench.gpu_watch import parse_gpu_samples
from tests.bench.replicas import grouped_by_limit, parse_case
from tests.bench.engine import judge_questions


def test_every_gpu_of_a_host_gives_a_sample():
    # nvidia-smi --query-gpu=index,memory.used,utilization.gpu,clocks.sm,temperature.gpu on a two-GPU host
    out = "0, 61676, 97, 1980, 51\n1, 61606, 0, 345, 38\n"
    samples = parse_gpu_samples(out, 12.5)
    assert samples == [{"t": 12.5, "gpu": 0, "mem_mib": 61676.0, "util": 97.0, "sm_mhz": 1980.0, "temp_c": 51.0},
                       {"t": 12.5, "gpu": 1, "mem_mib": 61606.0, "util": 0.0, "sm_mhz": 345.0, "temp_c": 38.0}]


def test_a_gpu_line_nvidia_smi_could_not_fill_is_refused():
    with pytest.raises(ValueError):
        parse_gpu_samples("0, 61676, [N/A], 1980, 51\n", 0.0)


@pytest.mark.parametrize("spec, case", [
    ("650x128", ("tokens", 650, 128, 1)),
    ("2048x256x2", ("tokens", 2048, 256, 2)),
    ("judge", ("judge", 650, 0, 1)),
    ("judgex40", ("judge", 650, 0, 40)),
    ("judge-groupedx40", ("judge-grouped", 650, 0, 40)),
])
def test_bench_replicas_cases(spec, case):
    assert parse_case(spec) == case


def test_the_grouped_judge_list_puts_its_long_answers_last():
    from preprocess.routing import decide
    from preprocess.settings import load

    routing = load({}).routing
    questions = judge_questions(650, "t")
    grouped = grouped_by_limit(questions)
    limits = [decide(q, routing).max_new_tokens for q in grouped]
    assert sorted(grouped) == sorted(questions) and limits == sorted(limits)
    assert limits[-89:] == [192] * 89 and limits[0] == 32  # the judge-like list's 89 code answers, together


def test_stage_times_are_the_window_s_own_per_request_means():
    def stats(requests, executions, queue_ns, infer_ns):
        return {"model_stats": [
            {"name": "preprocess", "version": "1", "inference_count": requests, "execution_count": executions,
             "inference_stats": {"queue": {"count": requests, "ns": queue_ns},
                                 "compute_infer": {"count": requests, "ns": infer_ns}}},
            {"name": "idle", "version": "1", "inference_count": 5, "execution_count": 5, "inference_stats": {}},
        ]}

    stages = stage_times(stats(10, 10, 1_000_000, 2_000_000), stats(74, 42, 321_000_000, 34_000_000))
    assert stages == {"preprocess": {"requests": 64, "executions": 32, "requests_per_execution": 2.0,
                                     "queue_ms": 5.0, "compute_input_ms": None, "compute_infer_ms": 0.5,
                                     "compute_output_ms": None}}


def test_engine_latency_splits_the_client_mean_at_the_engine():
    """Each replica's series counts; the window's own prompts only; other histograms ignored."""
    name = "llm_generator_e2e_latency_seconds"

    def scrape(count0, sum0, count1, sum1):
        return {f"{name}_count{{replica=0}}": count0, f"{name}_sum{{replica=0}}": sum0,
                f"{name}_count{{replica=1}}": count1, f"{name}_sum{{replica=1}}": sum1,
                "llm_generator_time_to_first_token_seconds_sum{replica=0}": 99.0}

    split = engine_latency(scrape(5, 4.0, 5, 6.0), scrape(55, 54.0, 45, 46.0), client_mean_ms=1100.0)
    assert split == {"prompts": 90, "engine_mean_ms": 1000.0, "outside_engine_ms": 100.0}
    assert engine_latency(scrape(5, 4.0, 5, 6.0), scrape(5, 4.0, 5, 6.0), 10.0) is None  # no prompt in the window
    assert engine_latency({}, {}, 10.0) is None  # no histogram metrics on this Triton


def test_engine_latency_reads_vllm_serve_s_histograms_with_their_phases():
    """`vllm serve`'s names and labels (as scrape_metrics keys them): time to first token and
    vLLM's queue, prefill and decode means; a series whose name begins with another's is not
    counted, and a phase that saw nothing is left out."""
    labels = "{engine=0,model_name=m}"

    def scrape(n, scale):
        values = {f"{count}{labels}": n for count, _ in VLLM_SERVE_ENGINE_SERIES.values()}
        values |= {f"{total}{labels}": n * scale * seconds for (_, total), seconds in zip(
            VLLM_SERVE_ENGINE_SERIES.values(), (0.1, 1.0, 0.01, 0.05, 0.8))}
        values |= {f"vllm:e2e_request_latency_seconds_created{labels}": 1.7e9,
                   f"vllm:e2e_request_latency_seconds_countx{labels}": 1e6}
        return values

    split = engine_latency(scrape(10, 1.0), scrape(74, 1.0), 1010.0, VLLM_SERVE_ENGINE_SERIES)
    assert split == pytest.approx({"prompts": 64, "engine_mean_ms": 1000.0, "outside_engine_ms": 10.0,
                                   "engine_ttft_mean_ms": 100.0, "engine_queue_mean_ms": 10.0,
                                   "engine_prefill_mean_ms": 50.0, "engine_decode_mean_ms": 800.0})


def test_latencies_ms_are_the_window_s_mean_and_percentiles():
    assert latencies_ms([0.3, 0.1, 0.2]) == pytest.approx({"mean_ms": 200.0, "p50_ms": 200.0, "p99_ms": 300.0})
    assert all(v != v for v in latencies_ms([]).values())  # an empty window: NaN, not a crash


def test_the_in_process_judge_counts_the_characters_of_its_cleaned_answers(tokenizer):
    """The replaced service's batch path in the GPU bench is credited with the characters of
    its cleaned answers, as the shim's /predict is (not with a count of something else)."""
    from preprocess.postprocess_stage import PostprocessStage
    from preprocess.preprocess_stage import PreprocessStage
    from preprocess.settings import load
    from tests.bench.workers import cleaned_chars

    rows = PreprocessStage(load({}), tokenizer).run(["What is a GPU?", "写一个 CUDA kernel"])
    texts = ["A GPU is a processor for parallel work.", "```cuda\n__global__ void k() {}\n```"]
    cleaned, _ = PostprocessStage(load({})).run(texts, [r.decision.route.value for r in rows],
                                                [r.decision.is_code for r in rows])
    assert cleaned_chars(rows, texts) == sum(len(a) for a in cleaned) > 40


def test_every_probe_of_the_first_piece_trace_finds_its_line_once(tmp_path):
    """The trace patches probes into a copy of this tree at lines it finds by their text: a
    change to one of those lines must fail here, not in a GPU session."""
    from tests.bench.first_piece_trace import instrumented_copy

    copy = instrumented_copy(tmp_path)
    try:
        assert "06 relay sent" in (copy / "preprocess/engine/stream_socket.py").read_text()
        assert "13 shim has the piece" in (copy / "shim/streaming.py").read_text()
    finally:
        shutil.rmtree(copy)
