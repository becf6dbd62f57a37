"""One replica against two, and tensor parallelism, on a two-GPU host: the product's /predict.

Three products stay resident side by side, so one round measures every path within
seconds of the others (A B C A B C ...) with no engine start between them:

- `baseline: 1 replica`: CUDA_VISIBLE_DEVICES=0, one engine;
- `2 replicas`: DATA_PARALLEL_SIZE=2, one engine per GPU, each request's prompts split;
- `TP=2`: TENSOR_PARALLEL_SIZE=2, one engine sharded over both GPUs;
- `2 replicas (in-stub front ends)`: two replicas with both AsyncLLMs in the generator stub
  (ENGINE_FRONTEND=thread), as before each got a process of its own;
- with `--compare-checkout DIR`, `2 replicas B`: two replicas served from another source tree.

Each engine gets --memory of each GPU it uses (three engines share the GPUs' memory, so
their KV caches are smaller than in production; all paths run under the same limit).
Cases: the judge-sized batch (650 x 128) and the benchmark's larger one (2048 x 256), with
ignore_eos so that every path generates exactly N x T tokens; and `judge`, the judge-shaped
batch of bench_engine (650 judge-like questions, the shipped routing limits, no ignore_eos),
scored as the judge scores it: answer characters per second; `judge-grouped`, the same
questions with the longest answer limits last (a list whose code questions come together).

    python -m tests.bench.replicas --model-dir DIR --out FILE
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.cpu import device_name  # noqa: E402
from tests.bench.engine import Product, Record, judge_questions, print_table  # noqa: E402
from tests.bench.gpu_watch import GpuSampler, gpu_processes  # noqa: E402

log = logging.getLogger("bench_replicas")

PRODUCT_ENV = {"BATCH_MODE": "1", "WARMUP_NUM_SAMPLES": "0", "DTYPE": "bfloat16",
               "SHIM_MAX_REQUEST_TOKENS": str(10**8), "SHIM_REQUEST_TIMEOUT_S": "3600"}
PATHS = {
    "baseline: 1 replica": {"CUDA_VISIBLE_DEVICES": "0"},
    "2 replicas": {"DATA_PARALLEL_SIZE": "2"},
    "TP=2": {"TENSOR_PARALLEL_SIZE": "2"},
    # Before each replica's AsyncLLM had a process of its own (process_runner.py).
    "2 replicas (in-stub front ends)": {"DATA_PARALLEL_SIZE": "2", "ENGINE_FRONTEND": "thread"},
}


def parse_case(spec: str) -> tuple[str, int, int, int]:
    """`NxT[xK]` (N prompts of T tokens), `judge[xK]` (N=650 judge-shaped questions, T=0:
    the routing decides) or `judge-grouped[xK]` (the same questions, the longest answer
    limits last), K requests back to back in one window: (kind, N, T, K)."""
    kind, _, rest = spec.partition("x") if spec.startswith("judge") else ("tokens", "", spec)
    numbers = [int(x) for x in rest.split("x")] if rest else []
    if kind in ("judge", "judge-grouped"):
        return kind, 650, 0, numbers[0] if numbers else 1
    return "tokens", numbers[0], numbers[1], numbers[2] if len(numbers) > 2 else 1


def grouped_by_limit(questions: list[str]) -> list[str]:
    """The questions in order of their routing's answer limit, the longest last (a list whose
    code questions come together), each limit's questions in their own order."""
    from preprocess.routing import decide
    from preprocess.settings import load

    routing = load(os.environ).routing
    return sorted(questions, key=lambda q: decide(q, routing).max_new_tokens)


def run_window(product: Product, kind: str, n: int, tokens: int, repeat: int, tag: str) -> tuple[str, dict, str]:
    """One path's window of `repeat` requests: (case name, the summed result, its rate key).
    Every path gets the same prompts (each product has its own engines, so no prefix cache
    is shared between paths); each request in a round has its own tag, so none finds
    another's prompts in its engine's cache."""
    if kind.startswith("judge"):
        order = grouped_by_limit if kind == "judge-grouped" else list
        results = [product.judge(order(judge_questions(n, f"{tag}j{k}"))) for k in range(repeat)]
        case, key = f"{kind} shipped limits", "chars"
    else:
        results = [product.batch(n, tokens, f"{tag}-{k}") for k in range(repeat)]
        case, key = f"batch {n}x{tokens}", "tokens"
    window = {key: sum(r[key] for r in results), "seconds": sum(r["seconds"] for r in results), "requests": repeat}
    return case + (f" x{repeat}" if repeat > 1 else ""), window, key


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", default="0.28")
    parser.add_argument("--cases", default="650x128,2048x256",
                        help="NxT[xK]: N prompts of T tokens, K requests back to back in one window; "
                             "judge[xK]: K judge-shaped batches, chars/s; judge-grouped[xK]: the same, long "
                             "answers last")
    parser.add_argument("--paths", default=",".join(PATHS), help="which of: " + ", ".join(PATHS))
    parser.add_argument("--ab", metavar="VAR=VALUE", help="instead: one replica as shipped against one with VAR=VALUE")
    parser.add_argument("--compare-checkout", type=Path, help="also `2 replicas B`: two replicas served from this "
                        "source tree (another commit)")
    args = parser.parse_args(argv)
    cases = [parse_case(c) for c in args.cases.split(",")]
    paths = {path: (PATHS[path], REPO) for path in args.paths.split(",")}
    if args.compare_checkout:
        paths["2 replicas B"] = (PATHS["2 replicas"], args.compare_checkout.resolve())
    if args.ab:
        name, value = args.ab.split("=", 1)
        paths = {"baseline: as shipped": ({"CUDA_VISIBLE_DEVICES": "0"}, REPO),
                 args.ab: ({"CUDA_VISIBLE_DEVICES": "0", name: value}, REPO)}
    record = Record(Path(args.out), {"device": device_name(), "bench": "replicas", "model_dir": args.model_dir,
                                     "memory_per_engine": args.memory, "rounds": args.rounds})
    products: dict[str, Product] = {}
    try:
        for path, (env, checkout) in paths.items():
            started = time.perf_counter()
            env = {**PRODUCT_ENV, "GPU_MEMORY_UTILIZATION": args.memory, **env}
            log_name = f"bench-replicas-{len(products)}.log"
            products[path] = Product(Path(args.model_dir).resolve(), env, checkout, log_name)
            info = products[path].info
            replicas = [(r["replica"], r["gpus"], r["backend"]) for r in info["replicas"]]
            log.info("%s up in %.0f s: %s", path, time.perf_counter() - started, replicas)
            if any(backend != "vllm" for _, _, backend in replicas):
                raise RuntimeError(f"{path}: not every replica runs vLLM: {replicas}")
            record.write(**{f"startup_s {path}": round(products[path].startup_s, 1),
                            f"replicas {path}": info["replicas"], f"scheduler {path}": info["scheduler"]})
        record.write(gpu_processes_loaded=gpu_processes())
        with GpuSampler() as sampler:
            for round_ in range(args.rounds):
                for kind, n, tokens, repeat in cases:
                    for path, product in products.items():
                        case, window, key = run_window(product, kind, n, tokens, repeat, f"r{round_}-{n}")
                        record.add(case, path, round_, window, key)
        record.write(gpu_samples=sampler.samples)
    finally:
        for product in products.values():
            product.close()
        record.write(gpu_processes_after=gpu_processes())
    print_table(record.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
