"""`./build.sh bench`: raw vLLM baselines and the product paths, side by side in one run.

Every path generates exactly `--max-tokens` tokens per prompt (ignore_eos) from the same
token ids, which the product's own preprocess stage builds, so they all do the same work.

    ./build.sh bench [--quick] [--model-dir DIR] [-n N] [--max-tokens T] [--out FILE]
    ./build.sh bench --perf-analyzer [--url 127.0.0.1:8010]   # sweep against a running server
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import (EMBEDDED_MODEL, http_json, over_replicas, scrape_metrics, server_env, start_server,  # noqa: E402
                            stop_server)
from tests.bench.perf_tools import perf_analyzer_command, perf_analyzer_env  # noqa: E402
from shim.progress import Heartbeat  # noqa: E402

log = logging.getLogger("bench")
QUESTIONS = ["What is a CUDA kernel?", "什么是共享内存？", "Explain warp divergence.", "GPU 的 SM 是什么？",
             "What does cudaMemcpy do?", "简述 GEMM 的分块思想。", "What is memory coalescing?", "Tensor Core 有什么用？"]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def latencies_ms(latencies: list[float]) -> dict:
    """A window's request latencies (seconds) as its mean, p50 and p99 in milliseconds."""
    mean = 1000 * sum(latencies) / len(latencies) if latencies else float("nan")
    return {"mean_ms": mean, "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99)}


def row(path, tokens, seconds, latencies, baseline=None):
    return {"path": path, "tok_s": tokens / seconds, "seconds": seconds, **latencies_ms(latencies),
            "baseline": baseline}


def generated_tokens(metrics_url: str) -> float:
    """The generator's own count of generated tokens (Triton's metrics port)."""
    return over_replicas(scrape_metrics(metrics_url)).get("llm_generator_generation_tokens_total", 0.0)


def check_generated(metrics_url: str, before: float, expected: int, label: str) -> None:
    """A path is credited only with tokens the engine says it generated (applied just after
    the answer, from the generator's metrics thread, hence the short wait)."""
    deadline = time.monotonic() + 30
    while (got := generated_tokens(metrics_url) - before) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    if got != expected:
        raise RuntimeError(f"{label}: the engine generated {got:.0f} tokens, {expected} expected")


def tagged_questions(n: int, tag: str, pool: list[str] = QUESTIONS) -> list[str]:
    return [f"[{tag}-{i}] {pool[i % len(pool)]}" for i in range(n)]


def prompts_and_ids(model_dir: Path, n: int, tag: str):
    """N questions and their token ids. Each path gets its own `tag` at the start of the
    question, so no path finds another's prompts in vLLM's prefix cache (the shared system
    prompt is cached for all, as in production)."""
    from preprocess.preprocess_stage import PreprocessStage
    from preprocess.settings import load
    from preprocess.tokenizer import load_tokenizer

    questions = tagged_questions(n, tag)
    rows = PreprocessStage(load(os.environ), load_tokenizer(model_dir)).run(questions)
    return questions, [r.token_ids for r in rows]


def offline_generate(model_dir, ids, max_tokens):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(str(model_dir), **engine_overrides())
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    warm = prompts_and_ids(model_dir, 4, "warm")[1]
    llm.generate([TokensPrompt(prompt_token_ids=i) for i in warm], params, use_tqdm=False)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    return tokens, seconds


def requests_at(concurrency: int, n: int) -> int:
    """Requests sent at a concurrency level: four rounds, at most N (the same for both sides)."""
    return max(concurrency, min(n, concurrency * 4))


async def at_concurrency(call, items, concurrency):
    """Results of `call` over `items` with at most `concurrency` in flight, and the seconds taken."""
    semaphore = asyncio.Semaphore(concurrency)

    async def limited(item):
        async with semaphore:
            return await call(item)

    started = time.perf_counter()
    results = await asyncio.gather(*(limited(item) for item in items))
    return results, time.perf_counter() - started


def exact_generator_inputs(batch_ids, max_tokens: int, client) -> list:
    """The generator model's inputs for token ids, exactly `max_tokens` each (greedy,
    ignore_eos): the generator alone, without the ensemble around it."""
    import numpy as np
    from tritonclient.utils import np_to_triton_dtype

    from preprocess.triton_io import pad_token_ids

    count = len(batch_ids)
    tensors = {"PROMPT_IDS": pad_token_ids(batch_ids), "MAX_TOKENS": np.full((count, 1), max_tokens, np.int32),
               "TEMPERATURE": np.zeros((count, 1), np.float32), "TOP_P": np.ones((count, 1), np.float32),
               "TOP_K": np.ones((count, 1), np.int32), "REPETITION_PENALTY": np.ones((count, 1), np.float32),
               "FREQUENCY_PENALTY": np.zeros((count, 1), np.float32), "IGNORE_EOS": np.ones((count, 1), np.bool_)}
    inputs = []
    for name, array in tensors.items():
        tensor = client.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def engine_overrides():
    from preprocess.engine.config import engine_kwargs
    from preprocess.engine_settings import load_engine
    from preprocess.engine.service import accelerator_available

    kwargs = engine_kwargs(load_engine(os.environ, cpu_only=not accelerator_available()), "")
    return {k: v for k, v in kwargs.items() if k in ("dtype", "enforce_eager", "gpu_memory_utilization",
                                                     "enable_prefix_caching", "max_model_len")}


_request_numbers = iter(range(10**9))


async def timed_generate(engine, token_ids, params) -> tuple[int, float]:
    """One request through an AsyncLLM: (tokens generated, seconds)."""
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    async for out in engine.generate(TokensPrompt(prompt_token_ids=token_ids), params, f"r{next(_request_numbers)}"):
        final = out
    return len(final.outputs[0].token_ids), time.perf_counter() - started


async def async_llm(model_dir, n, max_tokens, concurrency_levels):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_dir), **engine_overrides()))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0,
                            output_kind=RequestOutputKind.FINAL_ONLY)

    def one(token_ids):
        return timed_generate(engine, token_ids, params)

    await asyncio.gather(*(one(i) for i in prompts_and_ids(model_dir, 4, "warm")[1]))
    results = {}
    for concurrency in concurrency_levels:
        ids = prompts_and_ids(model_dir, n, f"async{concurrency}")[1]
        done, seconds = await at_concurrency(one, ids[:requests_at(concurrency, n)], concurrency)
        results[concurrency] = (sum(t for t, _ in done), seconds, [s for _, s in done])
    engine.shutdown()
    return results


def product_paths(server, model_dir, n, max_tokens, concurrency_levels):
    return asyncio.run(_product_paths(server, model_dir, n, max_tokens, concurrency_levels))


async def _product_paths(server, model_dir, n, max_tokens, concurrency_levels):
    import tritonclient.http.aio as triton_aio

    from shim.ensemble import build_inputs

    client = triton_aio.InferenceServerClient(server.triton_url, conn_limit=512, conn_timeout=3600)
    rows = []
    questions = {tag: prompts_and_ids(model_dir, n, tag) for tag in
                 ("generator", "ensemble", "shim", "generator1", "ensemble1", "shim1",
                  *(f"{path}{c}" for c in concurrency_levels[1:] for path in ("ens", "gen")))}
    overrides = {"max_new_tokens": max_tokens, "ignore_eos": True, "repetition_penalty": 1.0,
                 "frequency_penalty": 0.0}

    def generator_inputs(batch_ids):
        return exact_generator_inputs(batch_ids, max_tokens, triton_aio)

    async def in_chunks(model, make_inputs, items, size=512):
        """Batches above max_batch_size go as concurrent requests of at most `size`, as the shim does."""
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        return await asyncio.gather(*(client.infer(model, make_inputs(chunk)) for chunk in chunks))

    async def shim_batch():
        status, body = await asyncio.to_thread(http_json, "POST", server.url + "/predict",
                                               {"prompt": questions["shim"][0], **overrides}, timeout=3600)
        assert status == 200 and len(body["response"]) == n, (status, str(body)[:300])

    for label, call in (
        ("generator alone (batched requests)", lambda: in_chunks("generator", generator_inputs, questions["generator"][1])),
        ("ensemble, tritonclient (batched requests)",
         lambda: in_chunks("llm", lambda chunk: build_inputs(chunk, None, overrides), questions["ensemble"][0])),
        ("shim /predict batch", shim_batch),
    ):
        before = generated_tokens(server.metrics_url)
        started = time.perf_counter()
        with Heartbeat(log, f"  {label}"):
            await call()
        seconds = time.perf_counter() - started
        await asyncio.to_thread(check_generated, server.metrics_url, before, n * max_tokens, label)
        rows.append(row(label, n * max_tokens, seconds, [seconds], baseline="offline"))

    async def one_ensemble(question):
        started = time.perf_counter()
        await client.infer("llm", build_inputs([question], None, overrides))
        return time.perf_counter() - started

    async def one_generator(ids):
        # The generator alone: splits the ensemble's overhead from the engine hand-off's.
        started = time.perf_counter()
        await client.infer("generator", generator_inputs([ids]))
        return time.perf_counter() - started

    async def one_shim(question):
        started = time.perf_counter()
        status, _ = await asyncio.to_thread(http_json, "POST", server.url + "/predict", {"prompt": question, **overrides})
        assert status == 200
        return time.perf_counter() - started

    for path, one, column in (("generator", one_generator, 1), ("ensemble", one_ensemble, 0),
                              ("shim", one_shim, 0)):
        latencies = []
        with Heartbeat(log, f"  {path} single requests", status=lambda: f"{len(latencies)}/16"):
            for q in questions[f"{path}1"][column][:16]:
                latencies.append(await one(q))
        rows.append(row(f"{path} single request (c=1)", len(latencies) * max_tokens, sum(latencies), latencies,
                        baseline="async c=1"))
    rows.append(await stream_row(server, questions["shim1"][0][:16], max_tokens))
    for concurrency in concurrency_levels[1:]:
        for path, tag, one, column in (("generator", "gen", one_generator, 1), ("ensemble", "ens", one_ensemble, 0)):
            batch = questions[f"{tag}{concurrency}"][column][:requests_at(concurrency, n)]
            with Heartbeat(log, f"  {path} at concurrency {concurrency}, {len(batch)} requests"):
                latencies, seconds = await at_concurrency(one, batch, concurrency)
            rows.append(row(f"{path}, {concurrency} concurrent single requests", len(batch) * max_tokens, seconds,
                            latencies, baseline=f"async c={concurrency}"))
    await client.close()
    return rows


async def stream_row(server, questions, max_tokens):
    """Streamed chat, one at a time: the time to the first piece (p50/p99 columns) against
    the whole answer's time (the single-request rows' p50)."""
    import httpx

    first_piece, seconds, tokens = [], 0.0, 0
    async with httpx.AsyncClient(timeout=600) as http:
        for question in questions:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "stream": True,
                    "temperature": 0, "stream_options": {"include_usage": True}}
            started, first = time.perf_counter(), None
            async with http.stream("POST", server.url + "/v1/chat/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = time.perf_counter() - started
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            seconds += time.perf_counter() - started
            if first is not None:
                first_piece.append(first)
    return row("shim stream, time to first piece (c=1)", tokens, seconds, first_piece, baseline="async c=1")


def print_table(rows):
    by_name = {r["path"]: r for r in rows}
    print(f"\n{'path':52} {'tok/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'ratio':>7} {'+p50 ms':>8}  baseline")
    for r in rows:
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        if base is None and r["baseline"]:
            base = next((b for b in rows if b["path"].startswith(r["baseline"])), None)
        r["ratio"] = r["tok_s"] / base["tok_s"] if base else None
        r["p50_over_baseline_ms"] = r["p50_ms"] - base["p50_ms"] if base and "c=" in base["path"] else None
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        delta = f"{r['p50_over_baseline_ms']:+.1f}" if r["p50_over_baseline_ms"] is not None else "-"
        print(f"{r['path']:52} {r['tok_s']:9.0f} {r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {ratio:>7} {delta:>8}  "
              f"{base['path'] if base else ''}")


def run_baseline(args):
    """One baseline in this (child) process, so its engine and memory go away with it."""
    model_dir = Path(args.model_dir)
    levels = concurrency_levels(args.n)
    if args.baseline == "offline":
        tokens, seconds = offline_generate(model_dir, prompts_and_ids(model_dir, args.n, "offline")[1], args.max_tokens)
        rows = [row("offline", tokens, seconds, [seconds])]
    else:
        results = asyncio.run(async_llm(model_dir, args.n, args.max_tokens, levels))
        rows = [row(f"async c={c}", tokens, seconds, lat) for c, (tokens, seconds, lat) in results.items()]
    print("BASELINE " + json.dumps(rows), flush=True)


def concurrency_levels(n):
    return [1] + [c for c in (16, 64, 256) if c <= n]


def baseline_in_child(args, which):
    command = [sys.executable, "-m", "tests.bench.cpu", "--baseline", which, "--model-dir", args.model_dir,
               "-n", str(args.n), "--max-tokens", str(args.max_tokens)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    line = next((l for l in run.stdout.splitlines() if l.startswith("BASELINE ")), None)
    if line is None:
        raise RuntimeError(f"baseline {which} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return json.loads(line[len("BASELINE "):])


def run_bench(args):
    model_dir = Path(args.model_dir)
    levels = concurrency_levels(args.n)
    with Heartbeat(log, f"[1/3] offline LLM.generate, {args.n} prompts x {args.max_tokens} tokens"):
        rows = baseline_in_child(args, "offline")
    with Heartbeat(log, f"[2/3] in-process AsyncLLM at concurrency {levels}"):
        rows += baseline_in_child(args, "async")
    log.info("[3/3] the product: tritonserver + shim")
    started = time.perf_counter()
    with Heartbeat(log, "  server start to ok"):
        # The tests' work budget (conftest.server_env) would refuse the batch path's one request.
        server = start_server(server_env(model_dir, BATCH_MODE="1", WARMUP_NUM_SAMPLES="0",
                                         SHIM_MAX_REQUEST_TOKENS=str(10**8), SHIM_MAX_QUEUED_TOKENS=str(10**8),
                                         VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")),
                              "bench-server.log")
    startup_s = time.perf_counter() - started
    try:
        rows += product_paths(server, model_dir, args.n, args.max_tokens, levels)
    finally:
        stop_server(server)
    # The offline figure drifts between runs (14.8k-20.8k tok/s on the H200 with the same
    # code); a second measurement after the product shows how far it moved within this run.
    with Heartbeat(log, "offline LLM.generate again (drift check)"):
        again = baseline_in_child(args, "offline")[0]
    rows.append({**again, "path": "offline, again after the product (drift check)"})
    print_table(rows)
    print(f"\nserver start to ok (shim + tritonserver + engine + warm-up): {startup_s:.1f} s")
    result = {"model_dir": str(model_dir), "n": args.n, "max_tokens": args.max_tokens, "rows": rows,
              "startup_s": startup_s, "device": device_name()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"written to {args.out}")


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


def run_perf_analyzer(url: str, out: str | None):
    results = []
    for concurrency in (1, 16, 64, 256):
        cmd = perf_analyzer_command(url, str(concurrency), extra=["--measurement-interval", "10000",
                                                                  "--stability-percentage", "50"])
        print("$", " ".join(cmd), flush=True)
        run = subprocess.run(cmd, env=perf_analyzer_env(), capture_output=True, text=True)
        print(run.stdout[-1500:], run.stderr[-500:])
        results.append({"concurrency": concurrency, "returncode": run.returncode, "stdout": run.stdout[-3000:]})
    if out:
        Path(out).write_text(json.dumps(results, indent=1))
    failed = [r["concurrency"] for r in results if r["returncode"] != 0]
    if failed:
        raise SystemExit(f"perf_analyzer failed at concurrency {failed} (its output is above)")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s")
    parser = argparse.ArgumentParser(prog="./build.sh bench")
    parser.add_argument("--quick", action="store_true", help="N=256 x 32 tokens (a few minutes on 2 cores)")
    parser.add_argument("--perf-analyzer", action="store_true", help="concurrency sweep against a running server")
    parser.add_argument("--baseline", choices=("offline", "async"), help=argparse.SUPPRESS)
    parser.add_argument("--url", default="127.0.0.1:8010")
    parser.add_argument("--model-dir", default=str(EMBEDDED_MODEL))
    parser.add_argument("-n", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--out", default=str(REPO / "tests" / "bench" / "results" / "latest.json"))
    args = parser.parse_args(argv)
    if args.perf_analyzer:
        return run_perf_analyzer(args.url, args.out if args.out.endswith(".json") else None)
    args.n = args.n or 256
    args.max_tokens = args.max_tokens or (32 if args.quick else 128)
    if args.baseline:
        return run_baseline(args)
    run_bench(args)


if __name__ == "__main__":
    main()
