"""Closed-loop load on the ensemble over tritonclient, from one or several client processes;
and on an OpenAI `/v1/completions` door (the shim's or `vllm serve`'s), whole or streamed,
from one client written once for both.

A client process pays Python CPU for every request it sends and every answer it reads
(tritonclient builds and parses each HTTP message). When that CPU reaches the window's
length, the client and not the server sets the figure. `processes` > 1 spreads the same
concurrency over that many processes, as that many users' machines would; each reports
the CPU it spent (`client_cpu_s`, the busiest one's), so a window shows whether its client
was the limit.

Every process builds its client and imports first, then waits on one start event; the
window runs from that event until the last answer of the last process.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

from tests.bench.cpu import at_concurrency, latencies_ms, percentile


async def _closed_loop(triton_url: str, items: list, concurrency: int, overrides: dict,
                       ready=None, start=None) -> dict:
    """`items`: questions for the ensemble (`llm`); token-id lists for the generator alone."""
    import tritonclient.http.aio as triton_aio

    from shim.ensemble import build_inputs
    from tests.bench.cpu import exact_generator_inputs

    client = triton_aio.InferenceServerClient(triton_url, conn_limit=1024, conn_timeout=3600)

    def inputs(item):
        if isinstance(item, str):
            return "llm", build_inputs([item], None, overrides)
        return "generator", exact_generator_inputs([item], overrides["max_new_tokens"], triton_aio)

    async def one(item):
        started = time.perf_counter()
        await client.infer(*inputs(item))
        return time.perf_counter() - started

    try:
        if ready is not None:
            ready.set()
            await asyncio.to_thread(start.wait)
        cpu = time.process_time()
        latencies, seconds = await at_concurrency(one, items, concurrency)
        return {"latencies": latencies, "seconds": seconds, "cpu_s": time.process_time() - cpu}
    finally:
        await client.close()


def _client_process(triton_url, items, concurrency, overrides, ready, start, results) -> None:
    try:
        results.put(asyncio.run(_closed_loop(triton_url, items, concurrency, overrides, ready, start)))
    except BaseException as exc:  # the parent must hear of it, not wait for ever
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def online_load(triton_url: str, items: list, concurrency: int, overrides: dict,
                processes: int = 1) -> dict:
    """`items` (questions, or token-id lists for the generator alone) at `concurrency` in
    flight in all, over `processes` client processes."""
    if processes <= 1:
        done = asyncio.run(_closed_loop(triton_url, items, concurrency, overrides))
        return _summary(done["latencies"], done["seconds"], [done["cpu_s"]])
    context = multiprocessing.get_context("spawn")  # no inherited event loop or sockets
    start, results = context.Event(), context.Queue()
    readies, workers = [], []
    for k in range(processes):
        ready = context.Event()
        share = concurrency // processes + (k < concurrency % processes)
        workers.append(context.Process(target=_client_process, daemon=True, args=(
            triton_url, items[k::processes], max(1, share), overrides, ready, start, results)))
        readies.append(ready)
    for worker in workers:
        worker.start()
    try:
        for ready, worker in zip(readies, workers):
            while not ready.wait(1.0):
                if not worker.is_alive():
                    raise RuntimeError(f"a client process exited with {worker.exitcode} before the start")
        started = time.perf_counter()
        start.set()
        done = [results.get(timeout=3600) for _ in workers]
        seconds = time.perf_counter() - started
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    errors = [d["error"] for d in done if "error" in d]
    if errors:
        raise RuntimeError(f"client processes failed: {errors}")
    return _summary([s for d in done for s in d["latencies"]], seconds, [d["cpu_s"] for d in done])


def _summary(latencies: list[float], seconds: float, cpu: list[float]) -> dict:
    return {"seconds": seconds, **latencies_ms(latencies), "client_cpu_s": max(cpu), "client_processes": len(cpu)}


async def _openai_window(base_url: str, model: str, prompts: list[str], concurrency: int, tokens: int,
                         stream: bool) -> dict:
    import aiohttp

    async def one(session, prompt: str) -> dict:
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        arrivals, generated = [], None
        async with session.post(f"{base_url}/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{base_url} answered {response.status}: {(await response.text())[:300]}")
            if not stream:
                generated = (await response.json())["usage"]["completion_tokens"]
            else:
                async for line in response.content:  # one SSE line at a time
                    if not line.startswith(b"data: "):
                        continue  # blank separators and keep-alive comments
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise RuntimeError(f"{base_url}: the stream ended by an error: {chunk['error']}")
                    if chunk.get("usage"):
                        generated = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0].get("text"):
                        arrivals.append(time.perf_counter())
        if generated != tokens:  # every path is credited only with the tokens it was asked for
            raise RuntimeError(f"{base_url}: {generated} tokens generated, {tokens} asked")
        return {"seconds": time.perf_counter() - started, "started": started, "arrivals": arrivals}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=3600)) as session:
        done, seconds = await at_concurrency(lambda prompt: one(session, prompt), prompts, concurrency)
    result = {"tokens": len(prompts) * tokens, "seconds": seconds, **latencies_ms([d["seconds"] for d in done])}
    if stream:
        result.update(stream_latencies(done, tokens))
    return result


def stream_latencies(done: list[dict], tokens: int) -> dict:
    """Per-stream time to the first text (TTFT), the gaps between text chunks as they arrive
    (ITL, all streams' gaps pooled, as vLLM's serving benchmark counts them), and time per
    output token after the first (TPOT, per stream), in milliseconds."""
    ttft = [d["arrivals"][0] - d["started"] for d in done if d["arrivals"]]
    gaps = [later - earlier for d in done for earlier, later in zip(d["arrivals"], d["arrivals"][1:])]
    tpot = [(d["arrivals"][-1] - d["arrivals"][0]) / (tokens - 1) for d in done if len(d["arrivals"]) > 1]
    if len(ttft) != len(done):
        raise RuntimeError(f"{len(done) - len(ttft)} of {len(done)} streams sent no text")
    return {name: 1000 * percentile(values, q) for name, values, q in (
        ("ttft_p50_ms", ttft, 50), ("ttft_p99_ms", ttft, 99), ("itl_p50_ms", gaps, 50), ("itl_p99_ms", gaps, 99),
        ("tpot_p50_ms", tpot, 50))} | {"chunks_per_stream": (len(gaps) + len(ttft)) / len(done)}


def openai_load(base_url: str, model: str, prompts: list[str], concurrency: int, tokens: int,
                stream: bool = False) -> dict:
    """`prompts` to `base_url`'s /v1/completions, `concurrency` in flight, exactly `tokens`
    each (greedy, ignore_eos), as whole answers or as server-sent events (`stream`)."""
    return asyncio.run(_openai_window(base_url, model, prompts, concurrency, tokens, stream))


# The engine's own view of a request, as (count, sum) series: its time to first token and its
# whole time, from the product's generator (from the start of its `generate` on the engine's
# loop) and `vllm serve` (vLLM's request statistics, from the request's arrival at its engine
# client); both leave out HTTP, the chat template and tokenizing. Then vLLM's phases of a
# finished request on its engine core's clock (queue, prefill, decode), the same on both sides.
PHASES = ("queue", "prefill", "decode")
PRODUCT_ENGINE_SERIES = {
    "ttft": ("llm_generator_time_to_first_token_seconds_count", "llm_generator_time_to_first_token_seconds_sum"),
    "e2e": ("llm_generator_e2e_latency_seconds_count", "llm_generator_e2e_latency_seconds_sum"),
    **{phase: ("llm_generator_engine_requests_finished_total", f"llm_generator_engine_{phase}_seconds_total")
       for phase in PHASES}}
VLLM_SERVE_ENGINE_SERIES = {
    "ttft": ("vllm:time_to_first_token_seconds_count", "vllm:time_to_first_token_seconds_sum"),
    "e2e": ("vllm:e2e_request_latency_seconds_count", "vllm:e2e_request_latency_seconds_sum"),
    **{phase: (f"vllm:request_{phase}_time_seconds_count", f"vllm:request_{phase}_time_seconds_sum")
       for phase in PHASES}}


def window_mean_ms(before: dict, after: dict, series: tuple[str, str]) -> tuple[int, float | None]:
    """(observations, their mean in ms) that a (count, sum) series pair gained between two
    scrapes (`scrape_metrics`), over all label sets (replicas, engines, models); the mean is
    None when nothing was observed."""
    def gained(name: str) -> float:
        def total(values: dict) -> float:
            return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))
        return total(after) - total(before)

    count, seconds = (gained(name) for name in series)
    return int(count), (1000 * seconds / count if count > 0 else None)


def engine_latency(before: dict, after: dict, client_mean_ms: float,
                   series: dict = PRODUCT_ENGINE_SERIES) -> dict | None:
    """How much of a window's mean client latency its requests spent inside the engine, from
    two scrapes of the engine's metrics around the window (`series`: PRODUCT_ENGINE_SERIES or
    VLLM_SERVE_ENGINE_SERIES): the engine's mean whole time and time to first token, and
    vLLM's queue, prefill and decode means where the engine reports them. The rest
    (`outside_engine_ms`) is HTTP, the server's stages and queues, and the answer's way back.
    None when the end-to-end series is absent (a Triton without histogram metrics) or saw no
    prompt in the window."""
    count, engine_ms = window_mean_ms(before, after, series["e2e"])
    if engine_ms is None:
        return None
    split = {"prompts": count, "engine_mean_ms": round(engine_ms, 1),
             "outside_engine_ms": round(client_mean_ms - engine_ms, 1)}
    for name in ("ttft", *PHASES):
        mean = window_mean_ms(before, after, series[name])[1] if name in series else None
        if mean is not None:
            split[f"engine_{name}_mean_ms"] = round(mean, 1)
    return split


STAGE_PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def model_stats(triton_url: str) -> dict:
    """Triton's per-model statistics (`GET /v2/models/stats`), the input of `stage_times`."""
    from tests.conftest import http_json

    status, stats = http_json("GET", f"http://{triton_url}/v2/models/stats")
    if status != 200:
        raise RuntimeError(f"Triton's model statistics answered {status}: {str(stats)[:300]}")
    return stats


def stage_times(before: dict, after: dict) -> dict:
    """Where a window's requests spent their time in each Triton model, from two answers of
    `GET /v2/models/stats` taken around it: requests, executions and requests per execution
    (what the dynamic batcher gathered), and per request the mean milliseconds of each phase.
    `queue` is the wait for a free model instance. A compute phase is timed per execution and
    counted once for each request in it, so its per-request mean is the mean duration of the
    execution a request was part of (divide by requests per execution for the work per request)."""
    def by_model(stats: dict) -> dict:
        return {(m["name"], m.get("version", "")): m for m in stats.get("model_stats", [])}

    old, stages = by_model(before), {}
    for key, now in by_model(after).items():
        was = old.get(key, {})
        requests = now.get("inference_count", 0) - was.get("inference_count", 0)
        if requests <= 0:
            continue
        executions = now.get("execution_count", 0) - was.get("execution_count", 0)
        stage = {"requests": requests, "executions": executions,
                 "requests_per_execution": round(requests / executions, 2) if executions else None}
        for phase in STAGE_PHASES:
            new_phase = now.get("inference_stats", {}).get(phase, {})
            old_phase = was.get("inference_stats", {}).get(phase, {})
            count = new_phase.get("count", 0) - old_phase.get("count", 0)
            ns = new_phase.get("ns", 0) - old_phase.get("ns", 0)
            stage[f"{phase}_ms"] = round(ns / count / 1e6, 3) if count else None
        stages[key[0]] = stage
    return stages
