"""The image's entry on the GPU machine, the way the image runs it: `docker/entrypoint.sh`
(the judge preset, LLM_PREINSTALLED=1, the machine's own Python), started STARTS times.
Each start: seconds from launch to `GET /` serving, then the judge's batch (N questions in
one POST /predict) with its answer characters per second, then SIGTERM and the seconds to
exit. The first start is cold (no vLLM/torch compile cache); later ones are warm.

    python3 -m tests.gpu.entry_run --model-dir /tmp/models/qwen3-4b --out $OUT/entry.json [--starts 3] [-n 650]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.bench import tagged_questions
from tests.conftest import REPO, free_port, http_json


def one_start(model_dir: str, n: int, index: int, log_dir: Path) -> dict:
    env = dict(os.environ, MODEL_DIR=model_dir, PORT=str(free_port()), HOST="127.0.0.1", PYTHON=sys.executable,
               TRITON_HTTP_PORT=str(free_port()), TRITON_GRPC_PORT=str(free_port()),
               TRITON_METRICS_PORT=str(free_port()))
    url = f"http://127.0.0.1:{env['PORT']}"
    log_path = log_dir / f"entry-start-{index}.log"
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([str(REPO / "docker" / "entrypoint.sh")], env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {"start": index, "log": log_path.name}
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
        questions = tagged_questions(n, f"entry{index}")
        began = time.monotonic()
        status, body = http_json("POST", url + "/predict", {"prompt": questions}, timeout=360)
        seconds = time.monotonic() - began
        answers = body.get("response", []) if status == 200 else []
        chars = sum(len(a) for a in answers)
        result.update(batch_status=status, batch_answers=len(answers), batch_seconds=round(seconds, 2),
                      answer_chars=chars, answer_chars_per_s=round(chars / seconds, 1))
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
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.gpu.entry_run")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("-n", type=int, default=650)
    args = parser.parse_args()
    out = Path(args.out)
    runs = []
    for index in range(args.starts):
        runs.append(one_start(args.model_dir, args.n, index, out.parent))
        print(json.dumps(runs[-1]), flush=True)
    out.write_text(json.dumps({"runs": runs}, indent=1))
    return 0 if all("error" not in r and r.get("batch_answers") == args.n for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
