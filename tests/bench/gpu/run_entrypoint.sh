#!/usr/bin/env bash
# On the H100/H200 machine, after the .gpu parts are installed (README, "On a GPU machine with no network"): the image's
# own entry, docker/entrypoint.sh, on the pinned stack (docker/stack/nvidia.txt), started
# cold and then warm, each time with the judge's batch.
#   bash tests/bench/gpu/run_entrypoint.sh [qwen3-4b] [starts] [questions]
# Carry .gpu-tok (SmolLM2's tokenizer files). Writes entry.json and each start's log under $OUT.
set -euo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
shape=${1:-qwen3-4b}; starts=${2:-3}; n=${3:-650}
out=${OUT:-/tmp}
python3 tests/bench/gpu/check_stack.py
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
python3 -m pip install -q --no-deps psutil >/dev/null 2>&1 || true
[ -d "/tmp/models/$shape" ] || python3 tests/bench/gpu/make_model.py "$shape" "/tmp/models/$shape" --tokenizer .gpu-tok
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m tests.bench.gpu.entry_run --model-dir "/tmp/models/$shape" --out "$out/entry.json" --starts "$starts" -n "$n"
