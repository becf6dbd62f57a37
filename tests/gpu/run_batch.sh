#!/usr/bin/env bash
# On the H100/H200 machine, after the .gpu parts are installed (README "Benchmark").
#   bash tests/gpu/run_batch.sh qwen3-4b "650x128 2048x256" 3
# Carry .gpu-tok (SmolLM2's tokenizer files). Writes the JSON and logs under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
shape=${1:-qwen3-4b}; sizes=${2:-650x128}; rounds=${3:-3}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -m pip install -q --no-deps psutil hypothesis >/dev/null 2>&1 || true
python3 tests/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-540}" python3 -m tests.bench_batch --model-dir "/tmp/models/$shape" --sizes $sizes \
  --rounds "$rounds" --out "${OUT:-/tmp}/batch-$shape.json" > "${OUT:-/tmp}/batch-$shape.log" 2>&1 || echo "bench exited with $?"
grep "bench_batch\]\|x[0-9]*:\|written" "${OUT:-/tmp}/batch-$shape.log" | tail -40
cp tests/.artifacts/bench-batch-server.log "${OUT:-/tmp}/" 2>/dev/null || true
