"""The judge's batch, interleaved: offline `LLM.generate` (what the replaced service runs in
batch mode) against the product's shim `/predict`, A B A B A B, in one run.

Both engines stay resident for the whole run (each with GPU_MEMORY_UTILIZATION of the GPU),
so every round measures both paths within seconds of each other; no engine start sits
between them. Each size generates exactly --max-tokens per prompt (ignore_eos).

    python -m tests.bench_batch --model-dir DIR --sizes 650x128 2048x256 --rounds 3 --out FILE

The offline worker is a child process that takes one command per line on stdin.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.bench import device_name, prompts_and_ids, tagged_questions  # noqa: E402
from tests.conftest import http_json, server_env, start_server, stop_server  # noqa: E402

log = logging.getLogger("bench_batch")


def offline_worker(model_dir: str, memory: float) -> None:
    """Child: an offline LLM with vLLM's own defaults; `N T TAG` on stdin -> tok/s on stdout."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model_dir, gpu_memory_utilization=memory, dtype="bfloat16")
    config = llm.llm_engine.vllm_config.scheduler_config
    print("READY " + json.dumps({"max_num_seqs": config.max_num_seqs,
                                 "max_num_batched_tokens": config.max_num_batched_tokens}), flush=True)
    for line in sys.stdin:
        n, tokens, tag = line.split()
        ids = prompts_and_ids(Path(model_dir), int(n), tag)[1]
        params = SamplingParams(max_tokens=int(tokens), ignore_eos=True, temperature=0)
        started = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params, use_tqdm=False)
        seconds = time.perf_counter() - started
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        print("RESULT " + json.dumps({"tokens": generated, "seconds": seconds}), flush=True)


class Offline:
    def __init__(self, model_dir: str, memory: float):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.bench_batch", "--offline-worker",
                                         "--model-dir", model_dir, "--memory", str(memory)],
                                        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.config = json.loads(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        raise RuntimeError(f"the offline worker exited with {self.process.wait()}")

    def run(self, n: int, tokens: int, tag: str) -> dict:
        self.process.stdin.write(f"{n} {tokens} {tag}\n")
        self.process.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(60)


def shim_batch(server, model_dir: Path, n: int, tokens: int, tag: str) -> dict:
    questions = tagged_questions(n, tag)
    body = {"prompt": questions, "max_new_tokens": tokens, "ignore_eos": True, "repetition_penalty": 1.0,
            "frequency_penalty": 0.0}
    started = time.perf_counter()
    status, reply = http_json("POST", server.url + "/predict", body, timeout=3600)
    seconds = time.perf_counter() - started
    if status != 200 or len(reply["response"]) != n:
        raise RuntimeError(f"/predict answered {status}: {str(reply)[:300]}")
    return {"tokens": n * tokens, "seconds": seconds}


class GpuSampler:
    """nvidia-smi every second: memory, utilisation, SM clock; and which processes hold the GPU."""

    def __init__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        query = ["nvidia-smi", "--query-gpu=memory.used,utilization.gpu,clocks.sm,temperature.gpu",
                 "--format=csv,noheader,nounits"]
        while not self._stop.wait(1.0):
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip().split(",")
                self.samples.append({"t": time.time(), "mem_mib": float(out[0]), "util": float(out[1]),
                                     "sm_mhz": float(out[2]), "temp_c": float(out[3])})
            except Exception:
                continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


def gpu_processes() -> str:
    return subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv"],
                          capture_output=True, text=True).stdout


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[bench_batch] %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--sizes", nargs="+", default=["650x128"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=float, default=0.42)
    parser.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "tests" / "bench_results" / "batch-latest.json"))
    args = parser.parse_args(argv)
    if args.offline_worker:
        return offline_worker(args.model_dir, args.memory)
    model_dir = Path(args.model_dir)
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes]
    log.info("GPU before: %s", gpu_processes().strip())
    offline = Offline(str(model_dir), args.memory)
    log.info("offline LLM up, vLLM defaults: %s", offline.config)
    started = time.perf_counter()
    server = start_server(server_env(model_dir, BATCH_MODE="1", WARMUP_NUM_SAMPLES="0",
                                     GPU_MEMORY_UTILIZATION=str(args.memory), DTYPE="bfloat16",
                                     SHIM_MAX_REQUEST_TOKENS=str(10**8), SHIM_REQUEST_TIMEOUT_S="3600"),
                          "bench-batch-server.log")
    startup_s = time.perf_counter() - started
    info = server.get("/info")[1]
    log.info("product up in %.1f s; scheduler %s", startup_s, info.get("scheduler"))
    log.info("GPU with both: %s", gpu_processes().strip())
    results = {f"{n}x{t}": {"offline": [], "shim": []} for n, t in sizes}
    try:
        with GpuSampler() as sampler:
            for n, tokens in sizes:  # one warm-up of each path and size, not measured
                offline.run(min(n, 64), 8, f"warm{n}")
                shim_batch(server, model_dir, min(n, 64), 8, f"warm{n}")
            for round_ in range(args.rounds):
                for n, tokens in sizes:
                    for path in ("offline", "shim"):
                        tag = f"r{round_}-{path}-{n}"
                        got = (offline.run(n, tokens, tag) if path == "offline"
                               else shim_batch(server, model_dir, n, tokens, tag))
                        rate = got["tokens"] / got["seconds"]
                        results[f"{n}x{tokens}"][path].append(rate)
                        log.info("round %d %dx%d %-7s %8.0f tok/s (%.1f s)", round_ + 1, n, tokens, path, rate,
                                 got["seconds"])
    finally:
        stop_server(server)
        offline.close()
    log.info("GPU after: %s", gpu_processes().strip())
    table = {}
    for size, paths in results.items():
        ratios = [s / o for s, o in zip(paths["shim"], paths["offline"])]
        table[size] = {"offline": summary(paths["offline"]), "shim": summary(paths["shim"]),
                       "ratio_per_round": summary(ratios)}
        print(f"{size}: offline {table[size]['offline']['median']:.0f} "
              f"({min(paths['offline']):.0f}-{max(paths['offline']):.0f}), shim {table[size]['shim']['median']:.0f} "
              f"({min(paths['shim']):.0f}-{max(paths['shim']):.0f}), ratio median {statistics.median(ratios):.3f} "
              f"({min(ratios):.3f}-{max(ratios):.3f})")
    out = {"device": device_name(), "model_dir": str(model_dir), "memory_each": args.memory,
           "offline_scheduler": offline.config, "product_scheduler": info.get("scheduler"),
           "product_engine_args": info.get("engine_args"), "startup_s": startup_s, "table": table,
           "gpu_samples": sampler.samples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
