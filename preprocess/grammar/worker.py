"""The sandboxed grammar compiler: a child process that compiles response formats with
llguidance, the compiler vLLM's engine uses here, under an address-space limit.

Protocol, one JSON object per line: the parent's first line is
`{"tokenizer": <tokenizer.json text>, "n_vocab": N, "eos": id, "memory_mb": M}`; the worker
answers `{"ready": true}` (or `{"unavailable": "why"}` and exits). Then each line is a
RESPONSE_FORMAT (`{"json": schema}` or `{"json_object": true}`) and each answer
`{"error": null}` or `{"error": "what the compiler said"}`. A compile that needs more
memory than the limit ends this process (llguidance aborts on a failed allocation); the
parent reads that as a refusal and starts another worker.

Imports only llguidance and the standard library: the limit applies to the compile, not
to a framework's address space.
"""
from __future__ import annotations

import json
import resource
import sys


def address_space_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def compile_error(llguidance, tokenizer, kwargs: dict) -> str | None:
    """What the compiler refuses in this response format, or None. The schema is compiled
    as the engine compiles it (no free whitespace), then the first token mask is computed:
    a grammar no text can satisfy (`{"$ref": "#"}`) fails only there."""
    schema = kwargs["json"] if "json" in kwargs else {"type": "object"}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False})
    except (ValueError, TypeError, KeyError) as exc:
        return str(exc)
    problem = llguidance.LLMatcher.validate_grammar(grammar, None)
    if problem:
        return problem
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    if not matcher.is_error():
        matcher.compute_bitmask()
    if not matcher.is_error():
        return None
    error = first_line(matcher.get_error())
    return f"{error} (no JSON text satisfies the schema)" if error == "NoExtensionBias" else error


def first_line(text: str) -> str:
    """llguidance's errors carry a backtrace and parser state after the first line."""
    return (text or "grammar error").strip().splitlines()[0][:500]


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> int:
    setup = json.loads(sys.stdin.readline())
    try:
        import llguidance
    except ImportError as exc:
        reply({"unavailable": f"llguidance is not installed ({exc})"})
        return 0
    tokenizer = llguidance.LLTokenizer(setup["tokenizer"], n_vocab=setup.get("n_vocab"), eos_token=setup["eos"])
    limit = address_space_bytes() + int(setup["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    reply({"ready": True})
    for line in sys.stdin:
        try:
            error = compile_error(llguidance, tokenizer, json.loads(line))
        except MemoryError:
            error = f"compiling it needs more than {setup['memory_mb']} MB"
        except Exception as exc:  # noqa: BLE001 - whatever the compiler raises is the schema's problem
            error = first_line(f"{type(exc).__name__}: {exc}")
        reply({"error": error})
    return 0


if __name__ == "__main__":
    sys.exit(main())
