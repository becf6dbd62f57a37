#!/usr/bin/env bash
# One replica, judge-sized batch (650 x 128, six requests per window): an earlier commit
# against this tree, interleaved, three rounds, each side in its own server. Prepare the
# earlier tree here first:  rm -rf .gpu-old && mkdir .gpu-old && git archive REV | tar -x -C .gpu-old
# then on the GPU machine (after the .gpu parts), carry [".gpu-tok", ".gpu-old"]:
#   bash tests/gpu/run_ab_commits.sh
# PYTHONPATH points each side's shim and Triton stubs at its own code (the editable install
# would otherwise give both sides this tree's packages).
set -uo pipefail
export VLLM_USE_FLASHINFER_SAMPLER=0 LC_ALL=C.UTF-8 PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || python3 -m pip install -q --no-deps -e .
[ -d /tmp/models/qwen3-4b ] || python3 tests/gpu/make_model.py qwen3-4b /tmp/models/qwen3-4b --tokenizer .gpu-tok >/dev/null 2>&1
root=$PWD
for r in 1 2 3; do
  for side in new old; do
    dir=$root; [ $side = old ] && dir=$root/.gpu-old
    (cd "$dir" && PYTHONPATH=$dir timeout 170 python3 -m tests.bench_replicas --model-dir /tmp/models/qwen3-4b \
      --out "$out/ab-$side-$r.json" --rounds 1 --memory 0.42 --paths "baseline: 1 replica" --cases 650x128x6 \
      > "$out/ab-$side-$r.log" 2>&1; echo "$side $r rc=$?")
    grep "^batch\|up in" "$out/ab-$side-$r.log" | sed "s/^/$side $r: /"
    pkill -9 -f tritonserver; pkill -9 -f "VLLM::"; sleep 3
  done
done
