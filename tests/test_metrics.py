"""Triton's metrics port, with the generator's own figures, scraped after real requests."""
from __future__ import annotations

import time

import pytest

from .conftest import over_replicas, scrape_metrics


def scrape(url):
    """All replicas together (this session's server runs one)."""
    return over_replicas(scrape_metrics(url))

pytestmark = pytest.mark.server


def scrape_until(url, ready, timeout_s: float = 10.0) -> dict[str, float]:
    """The generator applies its figures from a thread of its own, just after answering."""
    deadline = time.monotonic() + timeout_s
    while True:
        values = scrape(url)
        if ready(values) or time.monotonic() > deadline:
            return values
        time.sleep(0.1)


def test_a_batch_of_n_prompts_reaches_vllm_as_one_grouped_submission(server):
    before = scrape(server.metrics_url)
    status, body = server.post("/predict", {"prompt": [f"q{i}" for i in range(48)], "max_new_tokens": 2})
    assert status == 200 and len(body["response"]) == 48
    after = scrape_until(server.metrics_url, lambda m: m["llm_generator_prompts_total"] -
                         before["llm_generator_prompts_total"] >= 48)
    assert after["llm_generator_prompts_total"] - before["llm_generator_prompts_total"] == 48
    # one sampling setting for the whole list: one engine submission, not 48
    assert after["llm_generator_engine_submissions_total"] - before["llm_generator_engine_submissions_total"] == 1
    assert after["llm_generator_requests_by_bucket_total{max_new_tokens=2}"] - \
        before.get("llm_generator_requests_by_bucket_total{max_new_tokens=2}", 0) == 48


def test_generator_figures_after_real_requests(server):
    """Exact deltas from this test's own two prompts (ignore_eos: 3 tokens each)."""
    prompts = ["hello", "你好"]
    prompt_tokens = sum(server.post("/explain", {"prompt": p})[1]["prompt_tokens"] for p in prompts)
    before = scrape(server.metrics_url)
    status, body = server.post("/predict", {"prompt": prompts, "max_new_tokens": 3, "ignore_eos": True})
    assert status == 200 and len(body["response"]) == 2
    finished = "llm_generator_engine_requests_finished_total"  # vLLM's figures, sent every 0.5 s
    m = scrape_until(server.metrics_url, lambda m: m["llm_generator_e2e_latency_seconds_count"] >=
                     before["llm_generator_e2e_latency_seconds_count"] + 2
                     and m.get(finished, 0) >= before.get(finished, 0) + 2)

    def delta(name):
        return m[name] - before.get(name, 0)

    assert delta("llm_generator_prompt_tokens_total") == prompt_tokens
    assert delta("llm_generator_generation_tokens_total") == 6
    assert delta("llm_generator_e2e_latency_seconds_count") == 2
    assert delta("llm_generator_time_to_first_token_seconds_count") == 2
    # vLLM's own phases of these requests, on its engine's clock: some prefill and, with 3
    # tokens, some decode. (At least 2: the /explain requests' figures may come in late, as
    # vLLM's figures are sent every 0.5 s.)
    assert delta(finished) >= 2
    phases = [delta(f"llm_generator_engine_{phase}_seconds_total") for phase in ("queue", "prefill", "decode")]
    assert phases[1] > 0 and phases[2] > 0 and phases[0] >= 0, phases
    assert m["llm_generator_engine_up"] == 1
    # The concurrency the KV cache holds: its tokens over the mean tokens per request so far.
    scheduler = server.get("/info")[1]["scheduler"]
    assert m["llm_generator_kv_cache_blocks_total"] == scheduler["kv_cache_blocks"]
    assert 0 <= m["llm_generator_kv_cache_blocks_used"] <= m["llm_generator_kv_cache_blocks_total"]
    mean = (m["llm_generator_prompt_tokens_total"] + m["llm_generator_generation_tokens_total"]) / \
        m["llm_generator_e2e_latency_seconds_count"]
    expected = scheduler["kv_cache_blocks"] * scheduler["block_size"] / mean
    assert m["llm_generator_kv_cache_concurrency"] == pytest.approx(expected, rel=0.01)
    # Triton's own figures are there too
    assert any(k.startswith("nv_inference_request_success") for k in m)


def test_the_waiting_queue_rises_under_load_where_tritons_pending_count_does_not(server):
    """The scaling signal: a batch larger than vLLM's max_num_seqs queues inside vLLM, which
    `vllm:num_requests_waiting` shows; Triton's pending count stays 0, because the generator
    hands every prompt to vLLM at once. The engine is held stopped until every prompt has
    been handed to it, then runs in slices: half again what it runs at once is queued in front
    of it, on any machine (four requests arriving one by one could each be answered before
    the next came)."""
    import threading

    from .conftest import engine_in_slices, request_outcome, wait_for

    info = server.get("/info")[1]
    capacity = info["scheduler"]["max_num_seqs"]
    prompts = [f"queued {k}" for k in range(capacity + capacity // 2)]
    received = "llm_generator_prompts_total{replica=0}"
    samples = []

    def sample():
        values = scrape_metrics(server.metrics_url)
        waiting = values.get('vllm:num_requests_waiting{replica=0}', 0.0)
        pending = sum(v for k, v in values.items() if k.startswith("nv_inference_pending_request_count"))
        samples.append((waiting, pending))
        return waiting > 0

    # Four requests at once, each within the session's per-request work limit, all within its queue limit.
    parts = [prompts[k::4] for k in range(4)]
    outcomes = []
    before = scrape_metrics(server.metrics_url).get(received, 0.0)
    all_in = threading.Event()
    with engine_in_slices(server, held=all_in):
        batches = [threading.Thread(target=lambda part=part: outcomes.append(request_outcome(
            "POST", server.url + "/predict", {"prompt": part, "max_new_tokens": 2}, timeout=600))) for part in parts]
        for batch in batches:
            batch.start()
        handed = wait_for(lambda: outcomes or scrape_metrics(server.metrics_url).get(received, 0.0) - before >= len(prompts),
                          300)  # or a request was answered (refused) meanwhile
        all_in.set()
        rose = wait_for(sample, 120)
        sample()
    for batch in batches:
        batch.join(600)
    assert [o.status for o in outcomes] == [200] * 4, outcomes
    assert handed, "the prompts never all reached the generator"
    assert rose, samples[-5:]
    assert all(pending == 0 for _, pending in samples), samples
    # and it drains: nothing waits once the batch is answered
    assert wait_for(lambda: scrape_metrics(server.metrics_url).get('vllm:num_requests_waiting{replica=0}') == 0, 30)
