#!/usr/bin/env bash
# On the two-GPU H200 machine, after the .gpu parts are installed (README, "On a GPU machine with no network"; docs/performance.md).
#   bash tests/bench/gpu/run_replicas.sh [qwen3-4b] [extra bench_replicas arguments]
# Carry .gpu-tok (SmolLM2's tokenizer files). Writes replicas.json, its log and the
# products' server logs under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
shape=${1:-qwen3-4b}; shift $(( $# < 1 ? $# : 1 ))
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -m pip install -q --no-deps psutil hypothesis >/dev/null 2>&1 || true
[ -d "/tmp/models/$shape" ] || python3 tests/bench/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout "${BENCH_TIMEOUT:-560}" python3 -m tests.bench.replicas --model-dir "/tmp/models/$shape" \
  --out "$out/replicas.json" "$@" > "$out/replicas.log" 2>&1 || echo "bench exited with $?"
grep "bench_replicas\]\|^batch\|^judge\|Error\|error" "$out/replicas.log" | grep -v "WARNING" | tail -40
cp tests/.artifacts/bench-replicas-*.log "$out/" 2>/dev/null || true
