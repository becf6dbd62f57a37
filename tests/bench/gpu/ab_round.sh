#!/usr/bin/env bash
# One round of run_ab_commits.sh (judge-sized batch, 650 x 128, six requests per window),
# each side in its own server, in the order given:  bash tests/bench/gpu/ab_round.sh ROUND new old
# For device calls that must each stay under their time limit; carry [".gpu-tok", ".gpu-old"].
set -uo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
round=$1; shift
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
[ -d /tmp/models/qwen3-4b ] || python3 tests/bench/gpu/make_model.py qwen3-4b /tmp/models/qwen3-4b --tokenizer .gpu-tok >/dev/null 2>&1
root=$PWD
for side in "$@"; do
  dir=$root; [ "$side" = old ] && dir=$root/.gpu-old
  (cd "$dir" && PYTHONPATH=$dir timeout 170 python3 -m tests.bench.replicas --model-dir /tmp/models/qwen3-4b \
    --out "$out/ab-$side-$round.json" --rounds 1 --memory 0.42 --paths "baseline: 1 replica" --cases 650x128x6 \
    > "$out/ab-$side-$round.log" 2>&1; echo "$side $round rc=$?")
  grep "^batch\|up in" "$out/ab-$side-$round.log" | sed "s/^/$side $round: /"
  pkill -9 -f tritonserver; pkill -9 -f "VLLM::"; sleep 3
done
