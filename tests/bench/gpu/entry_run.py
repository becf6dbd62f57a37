"""The image's entry on the GPU machine, the way the image runs it: `docker/entrypoint.sh`
(the judge preset, LLM_PREINSTALLED=1, the machine's own Python), started STARTS times.
Each start: seconds from launch to `GET /` serving, then the judge's batch (N questions in
one POST /predict) with its answer characters per second, then SIGTERM and the seconds to
exit. The first start is cold (no vLLM/torch compile cache); later ones are warm.

    python3 -m tests.bench.gpu.entry_run --model-dir /tmp/models/qwen3-4b --out $OUT/entry.json [--starts 3] [-n 650]

Start-up A/B (#38): `--variant NAME=JSON` (repeatable) names environments laid over the
preset; each round starts every variant once, the order alternating by round, and `--cold`
gives every start empty vLLM, Inductor and Triton caches. `--batches K` sends K judge
batches per start (the first after a start is the warm-up one; read the rest). vLLM's own
start-up breakdown is read from each start's log (VLLM_LOG_LEVEL=INFO).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import re
import tempfile
import time
from pathlib import Path

from tests.bench.cpu import tagged_questions
from tests.conftest import REPO, free_port, http_json


# vLLM's and the product's start-up lines, each to the seconds it reports.
BREAKDOWN = {
    "weights_s": r"Loading weights took ([0-9.]+) seconds",
    "model_load_s": r"Model loading took [0-9.]+ GiB (?:memory )?and ([0-9.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: ([0-9.]+) s",
    "graph_compile_s": r"Compiling a graph for .*? takes? ([0-9.]+) s",
    "compile_total_s": r"torch.compile (?:takes|took) ([0-9.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([0-9.]+) secs",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s",
    "engine_up_s": r"vLLM engine up in ([0-9.]+) ?s",
}


def breakdown(log_text: str) -> dict:
    found = {}
    for key, pattern in BREAKDOWN.items():
        values = [float(v) for v in re.findall(pattern, log_text)]
        if values:
            found[key] = round(sum(values), 1)
    return found


def one_start(model_dir: str, n: int, index: int, log_dir: Path, extra_env: dict | None = None,
              cold: bool = False, batches: int = 1, name: str = "") -> dict:
    extra_env = dict(extra_env or {})
    if cold:  # empty compile caches: what a fresh container starts with
        cache = tempfile.mkdtemp(prefix=f"cold-{index}-")
        extra_env.update(VLLM_CACHE_ROOT=f"{cache}/vllm", TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor",
                         TRITON_CACHE_DIR=f"{cache}/triton")
    env = dict(os.environ, **extra_env)
    env.update(MODEL_DIR=model_dir, PORT=str(free_port()), HOST="127.0.0.1", PYTHON=sys.executable,
               TRITON_HTTP_PORT=str(free_port()), TRITON_GRPC_PORT=str(free_port()),
               TRITON_METRICS_PORT=str(free_port()))
    url = f"http://127.0.0.1:{env['PORT']}"
    log_path = log_dir / f"entry-start-{index}{'-' + name if name else ''}.log"
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([str(REPO / "docker" / "entrypoint.sh")], env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"start": index, "variant": name, "env": extra_env, "log": log_path.name}
    try:
        while time.monotonic() - started < 420 and process.poll() is None:
            try:
                body = http_json("GET", url + "/", timeout=2)[1]
                if body.get("status") in ("ok", "batch"):
                    result["seconds_to_serving"] = round(time.monotonic() - started, 1)
                    result["health"] = body
                    break
            except OSError:
                pass
            time.sleep(0.5)
        if "seconds_to_serving" not in result:
            result["error"] = f"not serving after {time.monotonic() - started:.0f} s (exit {process.poll()})"
            return result
        info = http_json("GET", url + "/info")[1]
        result.update(backend=info.get("backend"), vllm_version=info.get("vllm_version"),
                      engine_fallback=info.get("engine_fallback"))
        for batch in range(batches):
            questions = tagged_questions(n, f"entry{index}-{batch}")
            began = time.monotonic()
            status, body = http_json("POST", url + "/predict", {"prompt": questions}, timeout=360)
            seconds = time.monotonic() - began
            answers = body.get("response", []) if status == 200 else []
            chars = sum(len(a) for a in answers)
            if batch == 0:
                result.update(batch_status=status, batch_answers=len(answers), batch_seconds=round(seconds, 2),
                              answer_chars=chars, answer_chars_per_s=round(chars / seconds, 1))
            else:
                result.setdefault("later_batches", []).append(
                    {"status": status, "answers": len(answers), "seconds": round(seconds, 2),
                     "answer_chars_per_s": round(chars / seconds, 1)})
    finally:
        began = time.monotonic()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        result.update(exit_code=process.returncode, seconds_to_exit=round(time.monotonic() - began, 1))
        result["breakdown"] = breakdown(log_path.read_text(errors="replace"))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.bench.gpu.entry_run")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("-n", type=int, default=650)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="an environment laid over the preset, as a JSON object (repeatable)")
    parser.add_argument("--cold", action="store_true", help="empty compile caches for every start")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--first-round", type=int, default=0, help="this call's first round (orders alternate)")
    args = parser.parse_args()
    out = Path(args.out)
    variants = [(name, json.loads(env)) for name, env in (v.split("=", 1) for v in args.variant)] or [("", {})]
    runs = []
    for index in range(args.first_round, args.first_round + args.starts):
        order = variants if index % 2 == 0 else variants[::-1]
        for name, extra_env in order:
            runs.append(one_start(args.model_dir, args.n, index, out.parent, extra_env, args.cold, args.batches, name))
            print(json.dumps(runs[-1]), flush=True)
            out.write_text(json.dumps({"runs": runs}, indent=1))
    return 0 if all("error" not in r and r.get("batch_answers") == args.n for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
