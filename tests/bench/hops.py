"""Time to the first piece of a stream, door by door, one request at a time (c=1).

The shim's SSE reaches the engine through five hops: HTTP to the shim, gRPC to Triton's
`llm_stream` ensemble, the preprocess stub, the `generator_stream` stub's relay, and the
Unix socket into the generator's process. Each door below skips one more of them, so the
differences between doors' medians say what each hop costs:

- `shim SSE`: POST /v1/completions with stream (the whole path);
- `llm_stream gRPC`: the shim's own stream client, straight to Triton (no shim HTTP);
- `generator_stream gRPC`: token ids to the relay model alone (no ensemble, no preprocess);
- `socket`: token ids straight into the generator's stream socket (no Triton at all);
- `vllm serve SSE`: vLLM's own server, when it runs beside (the peer).

Each request's own time to first token inside the engine (each server's histogram, read
around the request) splits every door's figure into the engine's part and the rest.

Doors take turns request by request, so a slow spell of the machine falls on all of them.
Every request has its own prompt (a tag per door and request): no door finds another's in
vLLM's prefix cache.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from tests.bench.cpu import percentile, tagged_questions

PIECE_OVERRIDES = {"ignore_eos": True, "temperature": 0.0, "verbatim": True}


async def _sse_first(session, base_url: str, model: str, prompt: str, tokens: int) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "ignore_eos": True, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    first = None
    async with session.post(f"{base_url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"{base_url} answered {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if first is None and line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter() - started
    if first is None:
        raise RuntimeError(f"{base_url}: the stream sent no text")
    return first


async def _grpc_first(stream_client, prompt: str, tokens: int) -> float:
    started, first = time.perf_counter(), None
    async for piece in stream_client.stream(prompt, None, {"max_new_tokens": tokens, **PIECE_OVERRIDES}):
        if first is None and piece.text:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("llm_stream sent no text")
    return first


async def _relay_first(client, ids: list[int], tokens: int) -> float:
    """generator_stream alone, over Triton's gRPC stream."""
    import tritonclient.grpc.aio as triton_grpc

    from tests.bench.cpu import exact_generator_inputs

    inputs = exact_generator_inputs([ids], tokens, triton_grpc)
    done = asyncio.Event()

    async def requests():
        yield {"model_name": "generator_stream", "inputs": inputs,
               "outputs": [triton_grpc.InferRequestedOutput(name) for name in ("TEXT", "FINISH_REASON", "ERROR")]}
        await done.wait()

    started, first = time.perf_counter(), None
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            raise RuntimeError(f"generator_stream: {error}")
        if kind := result.as_numpy("ERROR").reshape(-1)[0]:  # a failed stream ends in band
            raise RuntimeError(f"generator_stream: {kind.decode()}: {result.as_numpy('TEXT').reshape(-1)[0].decode()}")
        if first is None and result.as_numpy("TEXT").reshape(-1)[0]:
            first = time.perf_counter() - started
        if result.as_numpy("FINISH_REASON").reshape(-1)[0]:
            break
    done.set()
    if first is None:
        raise RuntimeError("generator_stream sent no text")
    return first


def _socket_first(path: Path, ids: list[int], tokens: int) -> float:
    from preprocess.engine.stream_socket import stream_events

    values = {"max_tokens": tokens, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
              "frequency_penalty": 0.0, "ignore_eos": True}
    started, first = time.perf_counter(), None
    for piece in stream_events(path, ids, values, lambda: False):
        if first is None and piece["text"]:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the stream socket sent no text")
    return first


async def _measure(server, model_dir: Path, requests: int, tokens: int, tag: str, peer_url: str | None) -> dict:
    import aiohttp
    import tritonclient.grpc.aio as triton_grpc

    from preprocess.engine.stream_socket import socket_path
    from preprocess.tokenizer import load_tokenizer
    from shim.streaming import StreamClient

    grpc_url = f"127.0.0.1:{server.env['TRITON_GRPC_PORT']}"
    path = socket_path(Path(server.env["LLM_RUNTIME_DIR"]))
    tokenizer = load_tokenizer(model_dir)
    stream_client, relay_client = StreamClient(grpc_url), triton_grpc.InferenceServerClient(grpc_url)
    doors = {
        "shim SSE": lambda session, p, ids: _sse_first(session, server.url, model_dir.name, p, tokens),
        "llm_stream gRPC": lambda session, p, ids: _grpc_first(stream_client, p, tokens),
        "generator_stream gRPC": lambda session, p, ids: _relay_first(relay_client, ids, tokens),
        "socket": lambda session, p, ids: asyncio.to_thread(_socket_first, path, ids, tokens),
    }
    if peer_url:
        doors["vllm serve SSE"] = lambda session, p, ids: _sse_first(session, peer_url, str(model_dir), p, tokens)
    histograms = {door: (server.metrics_url, PRODUCT_TTFT) for door in doors}
    if peer_url:
        histograms["vllm serve SSE"] = (f"{peer_url}/metrics", VLLM_TTFT)
    seconds = {door: [] for door in doors}
    engine = {door: [] for door in doors}
    try:
        async with aiohttp.ClientSession() as session:
            for k, door in enumerate(doors):  # one unmeasured request per door: connections, caches
                await doors[door](session, f"[{tag}-warm-{k}] hello", tokenizer.encode(f"[{tag}-warm-{k}] hello"))
            for i in range(requests):
                for k, (door, first) in enumerate(doors.items()):
                    prompt = tagged_questions(1, f"{tag}-{i}-{k}")[0]
                    before = await asyncio.to_thread(histogram, *histograms[door])
                    seconds[door].append(await first(session, prompt, tokenizer.encode(prompt)))
                    engine[door].append(await asyncio.to_thread(one_more, *histograms[door], before))
    finally:
        await stream_client.close()
        await relay_client.close()
    return {door: {"ttft_p50_ms": 1000 * percentile(s, 50), "ttft_p90_ms": 1000 * percentile(s, 90),
                   "ttft_min_ms": 1000 * min(s), "requests": len(s),
                   "engine_ttft_p50_ms": 1000 * percentile(engine[door], 50),
                   "outside_engine_p50_ms": 1000 * percentile([a - b for a, b in zip(s, engine[door])], 50)}
            for door, s in seconds.items()}


# Each server's own time-to-first-token histogram. The generator's starts when the stream
# reaches its engines (GeneratorService.stream); vLLM's when its front end takes the request.
PRODUCT_TTFT = "llm_generator_time_to_first_token_seconds"
VLLM_TTFT = "vllm:time_to_first_token_seconds"


def histogram(url: str, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram over all its series."""
    from tests.conftest import scrape_metrics

    values = scrape_metrics(url)
    return tuple(sum(v for key, v in values.items() if key.split("{")[0] == f"{name}_{part}")
                 for part in ("count", "sum"))


def one_more(url: str, name: str, before: tuple[float, float], wait_s: float = 2.0) -> float:
    """The one observation a histogram gained since `before`, in seconds (metrics may be
    applied off the request's thread: asked again until it lands, at most `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        count, total = histogram(url, name)
        if count == before[0] + 1:
            return total - before[1]
        if count > before[0] + 1 or time.monotonic() > deadline:
            raise RuntimeError(f"{name} at {url} counted {count - before[0]:.0f} requests, expected 1")
        time.sleep(0.005)


def ttft_by_door(server, model_dir: Path, requests: int, tokens: int, tag: str, peer_url: str | None = None) -> dict:
    """{door: time to first piece p50, p90, min (ms)} over `requests` requests a door."""
    return asyncio.run(_measure(server, model_dir, requests, tokens, tag, peer_url))
