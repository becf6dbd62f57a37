"""The engine at its limit: the product against vLLM's own anchors, interleaved, on one GPU.

Every engine stays resident for the whole run, side by side, each with --memory of the
GPU, so one round measures every path within seconds of the others (A B C A B C ...) and
no engine start sits between them. Ratios are taken per round, then summarised.

    python -m tests.bench.engine --plan batch  --model-dir DIR --out FILE
    python -m tests.bench.engine --plan online --model-dir DIR --out FILE

Each plan fits one 10-minute device call (tests/bench/gpu/run_engine.sh runs both):

- `batch`: baseline 1 (offline `LLM`, vLLM defaults), baseline 2 (offline `LLM`, the product's
  engine arguments) and shim `/predict`, each size N x T with ignore_eos; then the
  judge-shaped row with long-answer routing limits (shim against baseline 1 running the
  product's routing, template and clean-up in process).
- `online`: baseline 3 (`AsyncLLM` with the `vllm serve` usage context) against the ensemble
  over tritonclient at c=1/16/64/256; then the judge-shaped row with the routing limits
  as shipped. `--vllm-serve-http` adds baseline 4, `vllm serve` itself, and `--shim-http`
  the shim's `/v1/completions`, both driven by one client (tests.bench.clients.openai_load);
  `--streams` adds windows of server-sent events through both (time to first token,
  inter-token latency).

Memory per engine is below what one engine alone would get, so the KV cache is smaller than
in production; every path runs under the same limit.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.cpu import (QUESTIONS, check_generated, device_name, generated_tokens, prompts_and_ids,  # noqa: E402
                         tagged_questions)
from tests.bench.hops import ttft_by_door  # noqa: E402
from tests.bench.record import Record, print_table  # noqa: E402
from tests.bench.clients import (VLLM_SERVE_ENGINE_SERIES, engine_latency, model_stats, online_load,  # noqa: E402
                                 openai_load, stage_times)
from tests.bench.workers import Worker  # noqa: E402
from tests.conftest import http_json, scrape_metrics, server_env, start_server, stop_server  # noqa: E402
from tests.bench.gpu_watch import GpuSampler, gpu_processes  # noqa: E402
from tests.bench.process_cpu import CpuWindow, stub_pids  # noqa: E402

log = logging.getLogger("bench_engine")
SHIPPED_ROUTING = {"MAX_NEW_TOKENS": "32", "MAX_NEW_TOKENS_CODE_SOFT": "64", "MAX_NEW_TOKENS_CODE": "192"}
LONG_ROUTING = {"MAX_NEW_TOKENS": "128", "MAX_NEW_TOKENS_CODE_SOFT": "256", "MAX_NEW_TOKENS_CODE": "512"}
CODE_QUESTIONS = ["请写一个 CUDA kernel 实现向量加法。", "Write a C++ function for matrix multiplication.",
                  "用 Python 实现快速排序的代码。", "Write a CUDA kernel that does a parallel reduction."]
EXACT = {"ignore_eos": True, "temperature": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0}


def judge_questions(n: int, tag: str) -> list[str]:
    """N questions like the judge's: its Chinese set, English ones and code ones, mixed routes."""
    lines = (REPO / "tests" / "data" / "judge_questions.jsonl").read_text(encoding="utf-8").splitlines()
    pool = [json.loads(line)["question"] for line in lines if line.strip()] + QUESTIONS + CODE_QUESTIONS
    return tagged_questions(n, tag, pool)


def anchor_env(worker_env: dict, kind: str) -> dict:
    """Stock vLLM, no plugin, for every anchor but 2, which runs the product's engine as the
    generator builds it, plugin included (VLLM_FAST_PENALTIES)."""
    from preprocess.engine.config import choose_vllm_plugins
    from preprocess.engine_settings import load_engine
    from preprocess.engine.service import accelerator_available

    env = {**worker_env, "VLLM_PLUGINS": ""}
    if kind == "offline-product":
        choose_vllm_plugins(env, load_engine(env, metax=False, cpu_only=not accelerator_available()))
    return env


class Product:
    """The product behind its shim, and its ensemble reached over tritonclient."""

    def __init__(self, model_dir: Path, env: dict, checkout: Path = REPO, log_name: str = "bench-engine-server.log"):
        """`checkout`: the source tree whose shim, model repository and package it runs."""
        started = time.perf_counter()
        self.model_dir = model_dir
        if checkout != REPO:
            env = {**env, "PYTHONPATH": str(checkout)}
        self.server = start_server(server_env(model_dir, **env), log_name, cwd=checkout)
        self.startup_s = time.perf_counter() - started
        self.info = self.server.get("/info")[1]

    def predict(self, questions: list[str], overrides: dict) -> tuple[list[str], float]:
        started = time.perf_counter()
        status, reply = http_json("POST", self.server.url + "/predict", {"prompt": questions, **overrides},
                                  timeout=3600)
        seconds = time.perf_counter() - started
        if status != 200 or len(reply["response"]) != len(questions):
            raise RuntimeError(f"/predict answered {status}: {str(reply)[:300]}")
        return reply["response"], seconds

    def batch(self, n: int, tokens: int, tag: str) -> dict:
        before = generated_tokens(self.server.metrics_url)
        _, seconds = self.predict(tagged_questions(n, tag), {"max_new_tokens": tokens, **EXACT})
        check_generated(self.server.metrics_url, before, n * tokens, f"shim batch {n}x{tokens}")
        return {"tokens": n * tokens, "seconds": seconds}

    def judge(self, questions: list[str]) -> dict:
        answers, seconds = self.predict(questions, {})
        return {"chars": sum(len(a) for a in answers), "seconds": seconds}

    def online(self, concurrency: int, requests: int, tokens: int, tag: str, processes: int = 1,
               generator_only: bool = False) -> dict:
        """Closed-loop requests to the ensemble, or with `generator_only` to the generator
        model alone (the same prompts as token ids: what the ensemble adds, split off)."""
        items = prompts_and_ids(self.model_dir, requests, tag)[1] if generator_only else tagged_questions(requests, tag)
        url, metrics_url = self.server.triton_url, self.server.metrics_url
        before, metrics_before = model_stats(url), scrape_metrics(metrics_url)
        window = CpuWindow(self.server.process.pid)
        result = online_load(url, items, concurrency, {"max_new_tokens": tokens, **EXACT}, processes)
        return {"tokens": requests * tokens, **result, "cpu_core_share": window.core_shares(),
                "stages": stage_times(before, model_stats(url)),
                "engine": engine_latency(metrics_before, scrape_metrics(metrics_url), result["mean_ms"])}

    def http(self, concurrency: int, requests: int, tokens: int, tag: str, stream: bool = False) -> dict:
        """The shim's /v1/completions (the prompt verbatim, as `vllm serve` takes it), with
        each of its processes' share of a core over the window."""
        url, metrics_url = self.server.triton_url, self.server.metrics_url
        time.sleep(FIGURES_SETTLE_S)
        before, metrics_before = model_stats(url), scrape_metrics(metrics_url)
        window = CpuWindow(self.server.process.pid)
        result = openai_load(self.server.url, self.model_dir.name, tagged_questions(requests, tag), concurrency,
                             tokens, stream)
        shares, stages = window.core_shares(), stage_times(before, model_stats(url))
        time.sleep(FIGURES_SETTLE_S)
        return {**result, "cpu_core_share": shares, "stages": stages,
                "engine": engine_latency(metrics_before, scrape_metrics(metrics_url), result["mean_ms"])}

    def close(self) -> None:
        stop_server(self.server)


# vLLM's figures reach the generator's metrics every 0.5 s (0.25 s more from a replica's own
# process): a window's scrapes wait this long so its requests' phases fall inside it.
FIGURES_SETTLE_S = 1.0


def vllm_serve_load(worker, concurrency: int, requests: int, tokens: int, tag: str, stream: bool = False) -> dict:
    """Baseline 4's /v1/completions, through the same client as `Product.http`, with its
    processes' shares of a core (its API server is the worker's child)."""
    metrics_url = f"{worker.scheduler['url']}/metrics"
    metrics_before = scrape_metrics(metrics_url)
    window = CpuWindow(worker.process.pid, "bench worker")
    result = openai_load(worker.scheduler["url"], worker.scheduler["model"], tagged_questions(requests, tag),
                         concurrency, tokens, stream)
    return {**result, "cpu_core_share": window.core_shares(),
            "engine": engine_latency(metrics_before, scrape_metrics(metrics_url), result["mean_ms"],
                                     VLLM_SERVE_ENGINE_SERIES)}


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[bench_engine] %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", choices=("batch", "online"), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--sizes", nargs="+", default=["650x128", "1536x256"])
    parser.add_argument("--tokens", type=int, default=128, help="tokens per online request")
    parser.add_argument("--online", nargs="*", default=["1:8", "16:128", "64:512", "256:1024"],
                        help="CONCURRENCY:REQUESTS windows of the online plan (none: the judge row only, "
                        "with anchor 2 in it)")
    parser.add_argument("--judge-n", type=int, default=650)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=float, default=0.28, help="GPU memory share of each engine")
    parser.add_argument("--product-env", nargs="*", default=[], help="NAME=VALUE for the product and baseline 2")
    parser.add_argument("--compare-checkout", type=Path, help="a second source tree (another commit, or other "
                        "model configs): its product runs beside the first, path `ensemble B` (online plan)")
    parser.add_argument("--product-b-env", nargs="*", help="NAME=VALUE on top of --product-env for a second "
                        "product, path `ensemble B` (with --compare-checkout, that tree's; else this one)")
    parser.add_argument("--client-processes", type=int, nargs="+", default=[1],
                        help="ensemble online paths, one per count of client processes (tests/bench/clients.py)")
    parser.add_argument("--generator-alone", action="store_true",
                        help="online plan: also the generator model alone, same prompts as token ids")
    parser.add_argument("--skip-judge", action="store_true", help="online plan: no judge-shaped row")
    parser.add_argument("--vllm-serve-http", action="store_true",
                        help="online plan: also `vllm serve` itself over HTTP (path baseline4-vllm-serve-http)")
    parser.add_argument("--vllm-serve-args", default="", metavar="'ARGS'",
                        help="more arguments for that `vllm serve`, one string: "
                        "--vllm-serve-args='--stream-interval 8'")
    parser.add_argument("--shim-http", action="store_true",
                        help="online plan: also the shim's /v1/completions over HTTP (path `shim /v1`)")
    parser.add_argument("--skip-ensemble", action="store_true",
                        help="online plan: no tritonclient path to the ensemble (the shim's HTTP doors only)")
    parser.add_argument("--skip-in-process", action="store_true",
                        help="online plan: no baseline 3 (the ensemble's ratios are then to `vllm serve` alone)")
    parser.add_argument("--streams", nargs="*", default=[],
                        help="CONCURRENCY:REQUESTS windows of streamed /v1/completions: the shim's SSE and, with "
                        "--vllm-serve-http, vllm serve's")
    parser.add_argument("--ttft-hops", type=int, default=0, metavar="N",
                        help="online plan: time to first piece at c=1 through each door of the stream path, N "
                        "requests a door per round (tests/bench/hops.py)")
    parser.add_argument("--py-spy", help="folder for py-spy profiles of the shim and the stubs (round 2: the "
                        "largest batch, the ensemble at c=256, or the shim's last stream window)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    model_dir = Path(args.model_dir)
    routing = LONG_ROUTING if args.plan == "batch" else SHIPPED_ROUTING
    product_env = {"BATCH_MODE": "1", "WARMUP_NUM_SAMPLES": "0", "GPU_MEMORY_UTILIZATION": str(args.memory),
                   "DTYPE": "bfloat16", "SHIM_MAX_REQUEST_TOKENS": str(10**8), "SHIM_REQUEST_TIMEOUT_S": "3600",
                   **routing, **dict(item.split("=", 1) for item in args.product_env)}
    # The baselines read the same routing and engine variables the product does.
    worker_env = {**os.environ, **product_env}
    anchor1, anchor2 = ("baseline1-offline", "offline-vllm"), ("baseline2-product", "offline-product")
    if args.plan == "batch":
        kinds = [anchor1, anchor2]
    else:  # the online windows need anchor 3; the judge row anchor 1; the judge row alone also anchor 2
        kinds = [("baseline3-serve", "async-serve")] if args.online and not args.skip_in_process else []
        kinds += [anchor1] if not args.skip_judge else []
        kinds += [anchor2] if not args.online and not args.skip_judge else []
        kinds += [("baseline4-vllm-serve-http", "vllm-serve-http")] if args.vllm_serve_http else []
    record = Record(Path(args.out), {"device": device_name(), "plan": args.plan, "model_dir": str(model_dir),
                                     "memory_each": args.memory, "product_env": product_env,
                                     "product_b_env": args.product_b_env, "vllm_serve_args": args.vllm_serve_args,
                                     "gpu_before": gpu_processes()})
    workers, product, product_b = {}, None, None
    try:
        for name, kind in kinds:
            started = time.perf_counter()
            workers[name] = Worker(kind, str(model_dir), args.memory, env=anchor_env(worker_env, kind),
                                   extra_args=shlex.split(args.vllm_serve_args) if kind == "vllm-serve-http" else ())
            log.info("%s up in %.1f s: %s", name, time.perf_counter() - started, workers[name].scheduler)
        product = Product(model_dir, product_env)
        log.info("product up in %.1f s: %s", product.startup_s, product.info.get("scheduler"))
        if args.compare_checkout or args.product_b_env is not None:
            env_b = {**product_env, **dict(item.split("=", 1) for item in args.product_b_env or [])}
            checkout_b = args.compare_checkout.resolve() if args.compare_checkout else REPO
            product_b = Product(model_dir, env_b, checkout_b, "bench-engine-server-b.log")
            log.info("product B (%s, %s) up in %.1f s: %s", checkout_b, args.product_b_env, product_b.startup_s,
                     product_b.info.get("scheduler"))
            record.write(compare_checkout=str(checkout_b), product_b_env=env_b, product_b_startup_s=product_b.startup_s,
                         product_b_scheduler=product_b.info.get("scheduler"))
        record.write(schedulers={name: w.scheduler for name, w in workers.items()},
                     product_scheduler=product.info.get("scheduler"), product_engine_args=product.info.get("engine_args"),
                     product_startup_s=product.startup_s, gpu_with_all=gpu_processes())
        with GpuSampler() as sampler:
            if args.plan == "batch":
                run_batch_plan(args, workers, product, record)
            else:
                run_online_plan(args, workers, {"ensemble": product, "ensemble B": product_b}, record)
    finally:
        for each in (product, product_b):
            if each is not None:
                each.close()
        for worker in workers.values():
            worker.close()
    record.write(gpu_samples=sampler.samples, gpu_after=gpu_processes())
    print_table(record.table())
    print(f"written to {args.out}")


def run_batch_plan(args, workers, product, record) -> None:
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes]
    b1, b2 = workers["baseline1-offline"], workers["baseline2-product"]
    for n, _ in sizes:  # warm each path once per size (compile, graphs, caches); not measured
        for path in (b1, b2):
            path.run(op="batch", n=min(n, 64), tokens=8, tag=f"warm{n}")
        product.batch(min(n, 64), 8, f"warm{n}")
    for round_ in range(args.rounds):
        for n, tokens in sizes:
            case = f"batch {n}x{tokens}"
            record.add(case, "baseline1-offline", round_, b1.run(op="batch", n=n, tokens=tokens, tag=f"r{round_}b1"),
                       "tokens")
            record.add(case, "baseline2-product", round_, b2.run(op="batch", n=n, tokens=tokens, tag=f"r{round_}b2"),
                       "tokens")
            spies = profiler(args, product, record, case) if round_ == 1 and (n, tokens) == sizes[-1] else []
            record.add(case, "shim /predict", round_, product.batch(n, tokens, f"r{round_}shim"), "tokens")
            for spy in spies:
                spy.wait(120)  # py-spy stops on its own after -d seconds and writes its file then
        judge_round(args, b1, product, record, round_, "judge long", engine_floor=b2)


def profiler(args, product, record, case: str, path: str = "shim /predict") -> list[subprocess.Popen]:
    """py-spy on the product's shim and every stub for one window (its length taken from
    round 1)."""
    if not args.py_spy:
        return []
    seconds = next(m["seconds"] for m in record.measurements if m["case"] == case and m["path"] == path)
    folder = Path(args.py_spy)
    folder.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in {"shim": product.server.process.pid, **stub_pids(product.server.process.pid)}.items():
        out = folder / f"{name}-{case.replace(' ', '-').replace('=', '')}.txt"  # plain names travel back
        spies.append(subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", str(int(seconds) + 1), "--threads",
                                       "--nonblocking", "--format", "raw", "-o", str(out)]))
    return spies


def run_online_plan(args, workers, products: dict, record) -> None:
    b3, b1, b2 = workers.get("baseline3-serve"), workers.get("baseline1-offline"), workers.get("baseline2-product")
    b4 = workers.get("baseline4-vllm-serve-http")
    products = {name: p for name, p in products.items() if p is not None}
    shim = products["ensemble"]
    # The first product runs once per --client-processes count, product B with the last one.
    counts = {"ensemble": args.client_processes, "ensemble B": args.client_processes[-1:]}
    paths = {} if args.skip_ensemble else {f"{name}{'' if k == 1 else f' x{k} clients'}": (p, k, False)
                                           for name, p in products.items() for k in counts[name]}
    if args.generator_alone:
        paths["generator alone"] = (shim, 1, True)
    # The shim's own HTTP door (--shim-http, --streams) on each product: product B's paths end in " B".
    shim_doors = [("" if name == "ensemble" else " B", p) for name, p in products.items()]
    windows = [tuple(int(x) for x in w.split(":")) for w in args.online]
    streams = [tuple(int(x) for x in w.split(":")) for w in args.streams]
    if windows or streams:  # one short window on every path first (compile, graphs, caches); not measured
        if b3 is not None:
            b3.run(op="online", c=16, requests=32, tokens=8, tag="warm")
        if b4 is not None:
            vllm_serve_load(b4, 16, 32, 8, "warm4", stream=bool(streams))
        for product in products.values():
            product.online(16, 32, 8, "warm")
        if args.shim_http or streams:
            for each in products.values():
                each.http(16, 32, 8, "warmh", stream=bool(streams))
    hops = []
    for round_ in range(args.rounds):
        if args.ttft_hops:  # first in the round: short, and kept when a time limit cuts the round
            for name, each in products.items():
                doors = ttft_by_door(each.server, each.model_dir, args.ttft_hops, 4, f"r{round_}hops{name[-1]}",
                                     b4.scheduler["url"] if b4 is not None and name == "ensemble" else None)
                hops.append({"round": round_, "product": name, "doors": doors})
                record.write(ttft_hops=hops)
                log.info("round %d time to first piece by door, %s: %s", round_ + 1, name, ", ".join(
                    f"{door} {d['ttft_p50_ms']:.1f} ms" for door, d in doors.items()))
        for concurrency, requests in windows:
            case, tag = f"online c={concurrency}", f"r{round_}c{concurrency}"
            if b3 is not None:
                record.add(case, "baseline3-serve", round_,
                           b3.run(op="online", c=concurrency, requests=requests, tokens=args.tokens, tag=f"{tag}b3"),
                           "tokens")
            if b4 is not None:
                record.add(case, "baseline4-vllm-serve-http", round_,
                           vllm_serve_load(b4, concurrency, requests, args.tokens, f"{tag}b4"), "tokens")
            if args.shim_http:
                for suffix, each in shim_doors:
                    record.add(case, f"shim /v1{suffix}", round_,
                               each.http(concurrency, requests, args.tokens, f"{tag}h{suffix.strip()}"), "tokens")
            for number, (path, (product, processes, generator_only)) in enumerate(paths.items()):
                profiled = round_ == 1 and concurrency == 256 and number == 0  # stubs found by model name
                spies = profiler(args, product, record, case, path) if profiled else []
                record.add(case, path, round_, product.online(concurrency, requests, args.tokens, f"{tag}e{number}",
                                                              processes, generator_only), "tokens")
                for spy in spies:
                    spy.wait(120)
        for concurrency, requests in streams:
            case, tag = f"stream c={concurrency}", f"r{round_}s{concurrency}"
            sides = [(f"shim /v1 SSE{suffix}", lambda each=each, suffix=suffix: each.http(
                concurrency, requests, args.tokens, f"{tag}h{suffix.strip()}", stream=True)) for suffix, each in shim_doors]
            if b4 is not None:
                sides.append(("baseline4-vllm-serve-http", lambda: vllm_serve_load(
                    b4, concurrency, requests, args.tokens, f"{tag}b4", stream=True)))
            for path, measure in (sides if round_ % 2 == 0 else sides[::-1]):  # each side goes first in turn
                profiled = round_ == 1 and path == "shim /v1 SSE" and (concurrency, requests) == streams[-1]
                spies = profiler(args, shim, record, case, path) if profiled else []
                record.add(case, path, round_, measure(), "tokens")
                for spy in spies:
                    spy.wait(120)
        if not args.skip_judge:
            judge_round(args, b1, shim, record, round_, "judge shipped", products.get("ensemble B"), engine_floor=b2)
    if not args.skip_judge and b2 is not None:  # the judge-only plan: one batch step by step, on each engine
        steps = {name: worker.run(op="judge-steps", questions=judge_questions(args.judge_n, f"steps-{name}"))
                 for name, worker in (("baseline1-offline", b1), ("baseline2-product", b2))}
        record.write(judge_steps=steps)
        for name, result in steps.items():
            log.info("judge step by step, %s: %s", name, json.dumps(result))


def judge_round(args, replica, product, record, round_: int, case: str, product_b=None, engine_floor=None) -> None:
    """The judge's batch: the product's shim against the replaced service's batch path in
    process; with a product B, its shim too, A and B taking turns at going first; with an
    `engine_floor` (anchor 2), the same batch path on the product's engine settings."""
    anchor = replica.run(op="judge", questions=judge_questions(args.judge_n, f"r{round_}j1"))
    record.add(case, "baseline1-offline", round_, anchor, "chars")
    record.add(case, "baseline1-from-ids", round_, {**anchor, "seconds": anchor["from_ids_s"]}, "chars")
    if engine_floor is not None:
        record.add(case, "baseline2-product", round_,
                   engine_floor.run(op="judge", questions=judge_questions(args.judge_n, f"r{round_}j2")), "chars")
    shims = [("shim /predict", product, "js")] + ([("shim /predict B", product_b, "jb")] if product_b else [])
    for path, each, tag in (shims if round_ % 2 == 0 else shims[::-1]):
        record.add(case, path, round_, each.judge(judge_questions(args.judge_n, f"r{round_}{tag}")), "chars")


if __name__ == "__main__":
    main()
