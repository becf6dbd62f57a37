"""What vLLM's penalties cost the judge's batch, and what the generator's penalties save.

Two parts, on the GPU (docs/performance.md):

1. The penalty function alone, vLLM's against `preprocess/engine/penalties.py`, on random
   logits of the model's vocabulary at the judge batch's two phases (650 sequences early
   on, 90 long answers later), interleaved rounds of timed calls; both results compared
   with `torch.equal`.
2. The judge's batch step by step (`judge-steps`, as `LLM.generate` runs it) on two resident
   engines with the product's engine arguments: `stock` (vLLM's penalties) and `fast` (the
   generator's, through the plugin; on a GPU, where vLLM 0.25's V2 model runner samples
   with its own penalty kernel, the plugin cannot act and `fast` is vLLM's code too). Per
   round: stock with the shipped penalties, fast with them, stock with no penalties at all
   (the floor), stock again on stock's questions; then
   the judge row's chars/s on both. Stock and fast get the same questions (each on its own
   engine, so neither has seen them); the no-penalty floor gets questions of its own, because
   on stock's questions stock's prefix cache would skip their prefill; "stock again" shows
   what that cache is worth. Each engine answers one batch first, untimed.
   Whether fast gave stock's answers is recorded beside whether stock gave its own again,
   but neither settles sameness: with vLLM's engine in a process of its own, how a batch is
   first formed depends on when its requests reach it, and a second run hits the prefix
   cache. Part 1's `torch.equal`, and the engine test in `tests/unit/test_penalties.py`
   (engine in process, no prefix cache), settle it.

`--timeline` keeps every step's wall time; `--py-spy DIR` records the engine processes
(py-spy `--subprocesses`) through round 1's stock and no-penalty batches.

    python -m tests.bench.penalties --model-dir DIR --out FILE [--rounds 3] [--memory 0.3]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.cpu import device_name  # noqa: E402
from tests.bench.engine import SHIPPED_ROUTING, judge_questions  # noqa: E402
from tests.bench.record import summary as spread  # noqa: E402
from tests.bench.workers import Worker  # noqa: E402

log = logging.getLogger("bench_penalties")
NO_PENALTIES = {"REPETITION_PENALTY": "1.0", "FREQUENCY_PENALTY": "0.0"}


def penalty_function(vocab: int, rounds: int, calls: int = 50) -> dict:
    """Milliseconds per call of each implementation, and whether they agree, per shape."""
    import torch
    from vllm.v1.sample.ops.penalties import apply_all_penalties as stock

    from preprocess.engine.penalties import apply_all_penalties as fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    results = {}
    for rows, answer_len in ((650, 16), (90, 120)):
        prompts = torch.full((rows, 100), vocab, dtype=torch.int64)
        for row in range(rows):
            length = 20 + row % 80
            prompts[row, :length] = torch.randint(0, vocab, (length,), generator=generator)
        prompts = prompts.to(device)
        outputs = [torch.randint(0, vocab, (answer_len,), generator=generator).tolist() for _ in range(rows)]
        logits = (torch.randn(rows, vocab, generator=generator) * 3).to(device)
        ones = torch.ones(rows, device=device)
        args = (prompts, ones * 0.0, ones * 0.1, ones * 1.05)
        same = torch.equal(stock(logits.clone(), *args, outputs), fast(logits.clone(), *args, outputs))
        timings = {"stock": [], "fast": []}
        for _ in range(rounds):
            for name, function in (("stock", stock), ("fast", fast)):
                work = [logits.clone() for _ in range(calls)]
                torch.cuda.synchronize() if device.type == "cuda" else None
                started = time.perf_counter()
                for copy in work:
                    function(copy, *args, outputs)
                torch.cuda.synchronize() if device.type == "cuda" else None
                timings[name].append(1000 * (time.perf_counter() - started) / calls)
        results[f"{rows} rows x {answer_len} answer tokens"] = {
            "identical": same, **{name: spread(ms) for name, ms in timings.items()},
            "stock_over_fast": spread([s / f for s, f in zip(timings["stock"], timings["fast"])])}
        log.info("%d rows: %s", rows, results[f"{rows} rows x {answer_len} answer tokens"])
    return results


def engine_profile(folder: str | None, worker: Worker, path: str) -> subprocess.Popen | None:
    """py-spy on a worker and its engine-core process for the next batch (about 2 s)."""
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = Path(folder) / f"engine-{path.replace(', ', '-').replace(' ', '-')}.txt"
    spy = subprocess.Popen(["py-spy", "record", "-p", str(worker.process.pid), "--subprocesses", "-d", "4",
                            "-r", "200", "--nonblocking", "--format", "raw", "-o", str(out)])
    time.sleep(1.0)  # py-spy attaches before the batch starts
    return spy


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[bench_penalties] %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory", type=float, default=0.3)
    parser.add_argument("--judge-n", type=int, default=650)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeline", action="store_true", help="keep every step's wall time")
    parser.add_argument("--py-spy", help="folder for py-spy profiles of the engine processes (round 1)")
    args = parser.parse_args(argv)
    from preprocess.engine.penalties import PLUGIN_NAME

    with open(Path(args.model_dir) / "config.json") as handle:
        vocab = json.load(handle)["vocab_size"]
    result = {"device": device_name(), "rounds": args.rounds, "memory_each": args.memory,
              "function": penalty_function(vocab, args.rounds)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    env = {**os.environ, **SHIPPED_ROUTING, "GPU_MEMORY_UTILIZATION": str(args.memory), "DTYPE": "bfloat16",
           "BATCH_MODE": "1"}
    workers = {}
    try:
        for name, plugins in (("stock", ""), ("fast", PLUGIN_NAME)):
            workers[name] = Worker("offline-product", args.model_dir, args.memory, env={**env, "VLLM_PLUGINS": plugins})
            log.info("%s up: %s", name, workers[name].scheduler)
        # (path, engine, sampling overrides, which questions: the round's own, or the floor's)
        paths = (("stock", "stock", {}, "shared"), ("fast", "fast", {}, "shared"),
                 ("stock, penalties off", "stock", NO_PENALTIES, "floor"), ("stock again", "stock", {}, "shared"))
        for worker in workers.values():
            worker.run(op="judge-steps", questions=judge_questions(args.judge_n, "penalties-warm-up"))
        steps, judge = [], []
        for round_ in range(args.rounds):
            questions = {kind: judge_questions(args.judge_n, f"penalties-{round_}-{kind}")
                         for kind in ("shared", "floor")}
            for path, name, sampling_env, kind in paths:
                profiled = round_ == 1 and path in ("stock", "stock, penalties off")
                spy = engine_profile(args.py_spy, workers[name], path) if profiled else None
                run = workers[name].run(op="judge-steps", questions=questions[kind], env=sampling_env,
                                        timeline=args.timeline)
                if spy:
                    spy.wait(60)
                steps.append({"round": round_, "path": path, **run})
                log.info("steps %s: %s", path,
                         {k: run[k] for k in ("seconds", "steps", "ms_per_step_then", "ms_per_step_after")})
            for name in ("stock", "fast") if round_ % 2 == 0 else ("fast", "stock"):
                run = workers[name].run(op="judge", questions=questions["shared"])
                judge.append({"round": round_, "engine": name, **run, "chars_per_s": run["chars"] / run["seconds"]})
                log.info("judge %s: %.0f chars/s", name, run["chars"] / run["seconds"])
            result.update(steps=steps, judge=judge)
            Path(args.out).write_text(json.dumps(result, indent=1))
        summary = {}
        for path, *_ in paths:
            mine = [s for s in steps if s["path"] == path]
            summary[f"steps, {path}"] = {
                key: spread([s[key] for s in mine]) for key in ("seconds", "ms_per_step_then", "ms_per_step_after")}
            summary[f"steps, {path}"]["short_answers_done_s"] = spread(
                [min(s["done_by_max_tokens_s"].values()) for s in mine])
        for name in ("stock", "fast"):
            summary[f"judge chars/s, {name}"] = spread([j["chars_per_s"] for j in judge if j["engine"] == name])
        by_round = {(j["round"], j["engine"]): j["chars_per_s"] for j in judge}
        summary["judge fast / stock"] = spread([by_round[(r, "fast")] / by_round[(r, "stock")]
                                                for r in range(args.rounds)])
        digests = {(s["round"], s["path"]): s["answers_sha256"] for s in steps}
        for other in ("fast", "stock again"):
            summary[f"same answers as stock, {other}"] = [digests[(r, "stock")] == digests[(r, other)]
                                                          for r in range(args.rounds)]
        result["summary"] = summary
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(summary, indent=1))
    finally:
        for worker in workers.values():
            worker.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
