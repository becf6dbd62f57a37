"""See routing and clean-up without a server.

    python -m preprocess explain "question" [--system-prompt S] [--model-dir DIR]
    python -m preprocess clean "raw answer" --question "question"

Both read the same environment variables as the service (LONG_ANSWER_KEYWORDS, ...).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import settings as cfg
from .cleanup import clean_answer
from .preprocess_stage import PreprocessStage
from .tokenizer import load_tokenizer
from .routing import decide


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess")
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", help="route, token limit and the exact prompt text")
    explain.add_argument("question")
    explain.add_argument("--system-prompt", default=None)
    explain.add_argument("--model-dir", default=None)
    clean = sub.add_parser("clean", help="the cleaned answer")
    clean.add_argument("raw")
    clean.add_argument("--question", default="")
    args = parser.parse_args(argv)
    try:
        settings = cfg.load(os.environ)
        if args.command == "explain":
            stage = PreprocessStage(settings, load_tokenizer(args.model_dir or settings.model_dir))
            row = stage.run([args.question], [args.system_prompt])[0]
            result = {
                "route": row.decision.route.value,
                "max_new_tokens": row.decision.max_new_tokens,
                "is_code": row.decision.is_code,
                "prompt": row.text,
                "prompt_tokens": len(row.token_ids),
                "fast_chat_template": stage.formatter.fast,
            }
        else:
            decision = decide(args.question, settings.routing)
            result = {"route": decision.route.value,
                      "answer": clean_answer(args.raw, decision.route, decision.is_code, settings.cleanup)}
    except cfg.SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
