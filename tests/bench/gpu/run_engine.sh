#!/usr/bin/env bash
# On the H100/H200 machine, after the .gpu parts are installed (README, "On a GPU machine with no network"; docs/performance.md).
#   bash tests/bench/gpu/run_engine.sh batch  [qwen3-4b] [extra bench_engine arguments]
#   bash tests/bench/gpu/run_engine.sh online [qwen3-4b]
# Carry .gpu-tok (SmolLM2's tokenizer files) and, for a profile, .gpu-pyspy.
# Writes engine-PLAN.json, its log and the product's server log under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
plan=$1; shape=${2:-qwen3-4b}; shift $(( $# < 2 ? $# : 2 ))
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -m pip install -q --no-deps psutil hypothesis >/dev/null 2>&1 || true
if ls .gpu-pyspy/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps .gpu-pyspy/*.whl >/dev/null 2>&1 || true; fi
[ -d "/tmp/models/$shape" ] || python3 tests/bench/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout "${BENCH_TIMEOUT:-560}" python3 -m tests.bench.engine --plan "$plan" --model-dir "/tmp/models/$shape" \
  --out "$out/engine-$plan.json" "$@" > "$out/engine-$plan.log" 2>&1 || echo "bench exited with $?"
grep "bench_engine\]\|^batch\|^online\|^judge\|written\|Error\|error" "$out/engine-$plan.log" | grep -v "WARNING" | tail -50
cp tests/.artifacts/bench-engine-server.log "$out/server-$plan.log" 2>/dev/null || true
