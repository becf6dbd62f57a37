#!/usr/bin/env bash
# A copy of this source tree whose preprocess and postprocess models run COUNT instances
# each (Triton instance_group), for `bench_engine --compare-checkout DEST`.
#   bash tests/bench/gpu/stage_instances_checkout.sh /tmp/stages4 4
set -euo pipefail
dest=$1; count=$2
rm -rf "$dest"; mkdir -p "$dest"
tar --exclude=./.gpu --exclude=./.gpu-tok --exclude=./.gpu-pyspy --exclude=./.venv --exclude=./model \
    --exclude=./tests/.artifacts --exclude=./.git -cf - . | tar -xf - -C "$dest"
for model in preprocess postprocess; do
  sed -i -E "s/(instance_group \[\{ kind: KIND_CPU, count: )[0-9]+( \}\])/\1$count\2/" "$dest/model_repository/$model/config.pbtxt"
  grep -q "count: $count }" "$dest/model_repository/$model/config.pbtxt" || { echo "no instance_group in $model" >&2; exit 1; }
done
