#!/usr/bin/env bash
# One replica, judge-sized batch (650 x 128, six requests per window): an earlier commit
# against this tree, interleaved, three rounds, each side in its own server. Prepare the
# earlier tree here first:  rm -rf .gpu-old && mkdir .gpu-old && git archive REV | tar -x -C .gpu-old
# then on the GPU machine (after the .gpu parts), carry [".gpu-tok", ".gpu-old"]:
#   bash tests/bench/gpu/run_ab_commits.sh
# (or one round per device call: bash tests/bench/gpu/ab_round.sh ROUND new old). PYTHONPATH points
# each side's shim and Triton stubs at its own code (the editable install would otherwise
# give both sides this tree's packages).
set -uo pipefail
here=$(dirname "$0")
bash "$here/ab_round.sh" 1 new old
bash "$here/ab_round.sh" 2 old new
bash "$here/ab_round.sh" 3 new old
