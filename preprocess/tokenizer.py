"""The model's tokenizer, shared by the preprocess stage and the generator."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("preprocess.tokenizer")


def load_tokenizer(model_dir: str | Path):
    """The model's tokenizer, or None (then prompts fall back to plain text)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # no tokenizer only costs the chat template
        log.warning("no tokenizer in %s (%s); using plain prompts", model_dir, exc)
        return None
