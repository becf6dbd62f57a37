#!/usr/bin/env bash
# Container entry: the same entry as `./build.sh serve`, on the image's own Python
# (LLM_PREINSTALLED=1 skips the venv set-up). LLM_PRESET picks the variable preset:
# docker/run_model.sh (default: fills what is unset), docker/env_force.sh, or "" for none.
set -euo pipefail
cd "$(dirname "$0")/.."
export LLM_PREINSTALLED=1
preset=${LLM_PRESET-docker/run_model.sh}
if [ -n "$preset" ]; then exec ./build.sh serve "$preset"; fi
exec ./build.sh serve
