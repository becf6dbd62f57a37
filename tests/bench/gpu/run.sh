#!/usr/bin/env bash
# On the H100/H200 machine, after the .gpu parts are installed (README, "On a GPU machine with no network").
#   bash tests/bench/gpu/run.sh qwen3-4b 650 128
# Carry .gpu-tok (SmolLM2's tokenizer files). Writes the bench JSON under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
shape=${1:-qwen3-4b}; n=${2:-650}; tokens=${3:-128}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 tests/bench/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${BENCH_TIMEOUT:-480}" python3 -m tests.bench.cpu --model-dir "/tmp/models/$shape" -n "$n" --max-tokens "$tokens" \
  --out "${OUT:-/tmp}/bench-$shape.json" > "${OUT:-/tmp}/bench-$shape.log" 2>&1 || echo "bench exited with $?"
grep -v "WARNING\|warn(" "${OUT:-/tmp}/bench-$shape.log" | tail -30
cp tests/.artifacts/bench-server.log "${OUT:-/tmp}/bench-server-$shape.log" 2>/dev/null || true
