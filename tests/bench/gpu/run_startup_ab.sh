#!/usr/bin/env bash
# On the H100/H200 machine, after the .gpu parts are installed: cold starts of the image's
# entry (docker/entrypoint.sh, judge preset), one round per call, each variant once per round
# with empty compile caches, then three judge batches (docs/performance.md, "Start-up").
#   bash tests/bench/gpu/run_startup_ab.sh ROUND [qwen3-4b]
# Carry .gpu-tok. Writes startup-ROUND.json and each start's log under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1 VLLM_LOG_LEVEL=INFO
round=$1; shape=${2:-qwen3-4b}
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -m pip install -q --no-deps psutil >/dev/null 2>&1 || true
[ -d "/tmp/models/$shape" ] || python3 tests/bench/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m tests.bench.gpu.entry_run --model-dir "/tmp/models/$shape" --out "$out/startup-$round.json" --starts 1 \
  --first-round "$round" --cold --batches 3 -n 650 \
  --variant 'inductor={"VLLM_COMPILATION_CONFIG": "{}"}' \
  --variant 'eager={"VLLM_COMPILATION_CONFIG": "{\"backend\": \"eager\"}"}' \
  | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    later = [b["answer_chars_per_s"] for b in r.get("later_batches", [])]
    print(r["variant"], "serving", r.get("seconds_to_serving"), "first", r.get("answer_chars_per_s"),
          "later", later, r.get("breakdown"), r.get("error", ""), flush=True)'
