"""Where the judge's batch spends its time in the product: Triton's per-model statistics
(queue, compute) for each shim `/predict` batch, and py-spy on the generator stub.

    python3 tests/bench/gpu/profile_batch.py MODEL_DIR N TOKENS OUT_DIR

Runs on the GPU machine (tests/bench/gpu/run_batch.sh installs the project first).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.bench.engine import Product  # noqa: E402

MODELS = ("llm", "preprocess", "generator", "postprocess")


def stats(server) -> dict:
    out = {}
    for model in MODELS:
        body = json.loads(urllib.request.urlopen(f"http://{server.triton_url}/v2/models/{model}/stats").read())
        s = body["model_stats"][0]
        out[model] = {"count": s["inference_count"], "executions": s["execution_count"],
                      **{k: s["inference_stats"][k]["ns"] for k in ("queue", "compute_input", "compute_infer",
                                                                     "compute_output", "success")}}
    return out


def delta(after, before) -> dict:
    return {m: {k: after[m][k] - before[m][k] for k in after[m]} for m in after}


def main():
    model_dir, n, tokens, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    started = time.perf_counter()
    product = Product(model_dir, {"BATCH_MODE": "1", "WARMUP_NUM_SAMPLES": "0", "DTYPE": "bfloat16",
                                  "SHIM_MAX_REQUEST_TOKENS": str(10**8), "SHIM_REQUEST_TIMEOUT_S": "3600"})
    server, startup_s = product.server, time.perf_counter() - started
    runs = []
    try:
        generator_pid = server.generator_state()["pid"]
        product.batch(64, 8, "warm")
        for i in range(4):
            before = stats(server)
            spy = None
            if i == 2 and shutil.which("py-spy"):
                spy = subprocess.Popen(["py-spy", "record", "-p", str(generator_pid), "-d", "30", "--threads",
                                        "--format", "raw", "-o", str(out / "generator.raw"), "--nonblocking"])
                time.sleep(1)
            got = product.batch(n, tokens, f"p{i}")
            if spy is not None:
                spy.wait(60)
            d = delta(stats(server), before)
            runs.append({"seconds": got["seconds"], "tok_s": got["tokens"] / got["seconds"],
                         "models_ms": {m: {k: (v / 1e6 if k != "count" and k != "executions" else v)
                                           for k, v in d[m].items()} for m in d}})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        product.close()
    (out / "profile.json").write_text(json.dumps({"startup_s": startup_s, "n": n, "tokens": tokens,
                                                   "runs": runs}, indent=1))
    print(f"start to ok {startup_s:.1f} s")


if __name__ == "__main__":
    main()
