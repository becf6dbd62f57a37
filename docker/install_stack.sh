#!/usr/bin/env bash
# Installs one engine stack into a Python environment, the same way for the images and
# for ./build.sh:   docker/install_stack.sh ENGINE PYTHON      (ENGINE: cpu, nvidia)
#   1. docker/stack/ENGINE.txt: vLLM, torch, transformers, pinned;
#   2. NumPy 1.26.4 and docker/stack/common.txt: the Triton stub's pybind11 misreads
#      NumPy 2 tensors, so NumPy goes back below 2 after vLLM (pip warns; unused parts of
#      vLLM's dependencies want 2);
#   3. Triton 2.51 (the server inside nvidia-pytriton 0.7.0, without its client pins) and
#      the Python-backend stub for this Python.
set -euo pipefail
engine=${1:?usage: install_stack.sh ENGINE PYTHON}
py=${2:?usage: install_stack.sh ENGINE PYTHON}
here=$(cd "$(dirname "$0")" && pwd)
stack=$here/stack/$engine.txt
[ -f "$stack" ] || { echo "install_stack.sh: no stack $stack" >&2; exit 2; }
pip=("$py" -m pip install --disable-pip-version-check -q)

# pip's resolver warns about NumPy 2 and the CUDA-only vision wheels (neither is imported
# here); those lines are dropped, a failure never is.
quiet() {
  local out
  if ! out=$("${pip[@]}" "$@" 2>&1); then printf '%s\n' "$out" >&2; return 1; fi
  printf '%s\n' "$out" | grep -v "incompatible\|requires numpy\|which is not installed\|dependency resolver\|^$" >&2 || true
}

# torch's CPU builds are on PyTorch's index, not PyPI; a local wheel (pip's find-links) spares it.
index=()
if [ "$engine" = cpu ] && ! "$py" -m pip install -q --dry-run --no-index --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then
  index=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi
pins=$(grep -v '^\s*#' "$stack" | grep -v '^\s*$' || true)
if [ -n "$pins" ]; then
  echo "[stack] 1/3 engine: $(echo "$pins" | tr '\n' ' ')" >&2
  "${pip[@]}" "${index[@]}" -r "$stack"
else
  echo "[stack] 1/3 engine: the base image's ($("$py" -c 'import vllm; print("vLLM", vllm.__version__)' 2>&1 | tail -1))" >&2
fi
# CUDA builds of these come in beside CPU torch and break `import transformers`.
if [ "$engine" = cpu ]; then "$py" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true; fi
echo "[stack] 2/3 NumPy < 2 and the shim's libraries" >&2
quiet numpy==1.26.4 setuptools==78.1.1 -r "$here/stack/common.txt"
echo "[stack] 3/3 Triton 2.51 server and its Python stub" >&2
"${pip[@]}" --no-deps nvidia-pytriton==0.7.0
"$py" - <<'PY'
import shutil, sys, sysconfig
from pathlib import Path
home = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
stub = home / "backends" / "python" / "triton_python_backend_stub"
if not stub.exists():
    shutil.copy2(home / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / stub.name, stub)
print(f"[stack] Triton stub for Python {sys.version_info[0]}.{sys.version_info[1]} in place", file=sys.stderr)
PY
