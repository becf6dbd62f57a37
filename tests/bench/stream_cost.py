"""CPU time per streamed piece in each process of the product: the shim, tritonserver, each
model's stub and vLLM's engine processes, read from /proc around windows of concurrent
streams (`/v1/completions`, `stream: true`, exactly `--tokens` tokens each, greedy). The
tiny test model keeps the engine cheap, so the rest of the stream path shows.

    python -m tests.bench.stream_cost [--checkout TREE] [--env NAME=VALUE ...] [--rounds 2]
        [--concurrency 64] [--out FILE]

`--checkout`: run that source tree's shim and model repository (another commit) on this
venv; `--env`: variables on top of the server's (VLLM_STREAM_INTERVAL=1). Prints one JSON
line per window; `--out` keeps them all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.bench.clients import openai_load  # noqa: E402
from tests.bench.process_cpu import CpuWindow  # noqa: E402
from tests.conftest import TINY_MODEL, build_tiny_model, server_env, start_server, stop_server  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    model = build_tiny_model(TINY_MODEL)
    limits = {name: str(args.tokens) for name in ("MAX_NEW_TOKENS", "MAX_NEW_TOKENS_CODE_SOFT", "MAX_NEW_TOKENS_CODE")}
    env = server_env(model, USE_VLLM="true", SHIM_MAX_REQUEST_TOKENS=str(10**7), SHIM_MAX_QUEUED_TOKENS=str(10**8),
                     **limits, **({"PYTHONPATH": str(checkout)} if checkout != REPO else {}),
                     **dict(item.split("=", 1) for item in args.env))
    server = start_server(env, "stream-cost-server.log", cwd=checkout)
    windows = []
    try:
        prompts = [f"Question {i}: what is a GPU?" for i in range(args.concurrency)]
        openai_load(server.url, model.name, prompts, args.concurrency, 8, stream=True)  # warm, not measured
        root = server.process.pid
        for round_ in range(args.rounds):
            cpu = CpuWindow(root)
            result = openai_load(server.url, model.name, prompts, args.concurrency, args.tokens, stream=True)
            spent, _ = cpu.spent()
            chunks = round(result["chunks_per_stream"] * args.concurrency)
            window = {"checkout": str(checkout), "env": args.env, "round": round_, "streams": args.concurrency,
                      "tokens": result["tokens"], "seconds": round(result["seconds"], 2), "tok_s": round(result["tokens"] / result["seconds"], 1),
                      "chunks": chunks, "cpu_ms_per_100_chunks": {k: round(1e5 * v / chunks, 1) for k, v in sorted(spent.items())},
                      "cpu_ms_per_stream": {k: round(1e3 * v / args.concurrency, 2) for k, v in sorted(spent.items())},
                      "ttft_p50_ms": round(result["ttft_p50_ms"], 1), "at": time.strftime("%H:%M:%S")}
            print(json.dumps(window), flush=True)
            windows.append(window)
    finally:
        stop_server(server)
    if args.out:
        args.out.write_text(json.dumps(windows, indent=1))


if __name__ == "__main__":
    main()
