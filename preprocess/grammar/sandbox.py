"""The response format compiled once before the engine sees it, in a child process whose
memory and time are bounded (preprocess/grammar/worker.py).

Why a process: the static bounds (preprocess/grammar/limits.py) cannot foresee every way
a schema makes a large grammar, and a compile that runs away inside the generator took
the whole host's memory. Here it can take at most `memory_mb` and `timeout_s`; past
either, the worker is ended, the request gets a 400 naming the limit, and the next check
starts a fresh worker. A schema that passes here compiles in the engine with the same
compiler and tokenizer, so within the same bounds. Results are cached per schema text.
"""
from __future__ import annotations

import json
import logging
import select
import subprocess
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..contract import InvalidRequest
from ..stub import python_executable

log = logging.getLogger("preprocess.grammar")

WORKER = Path(__file__).with_name("worker.py")
CACHE_SIZE = 256


def tokenizer_setup(tokenizer: Any) -> dict[str, Any] | None:
    """What the worker needs to build llguidance's tokenizer, as vLLM builds it
    (llguidance.hf.from_tokenizer), or None for a tokenizer it cannot take (not a fast one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from copy import copy

    backend = copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return {"tokenizer": backend.to_str(), "n_vocab": len(tokenizer), "eos": tokenizer.eos_token_id}


class GrammarSandbox:
    def __init__(self, tokenizer: Any, memory_mb: int, timeout_s: float):
        self.setup = tokenizer_setup(tokenizer)
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.unavailable: str | None = None if self.setup else "the tokenizer is not a fast one"
        self._process: subprocess.Popen | None = None
        self._cache: OrderedDict[str, str | None] = OrderedDict()
        self._lock = threading.Lock()  # one compile at a time: the worker reads one line at a time

    def check(self, response_format: str) -> None:
        """InvalidRequest with the compiler's words or the limit exceeded, for a
        RESPONSE_FORMAT (controls.structured_output's form) the engine could not honour."""
        if not response_format:
            return
        with self._lock:
            if response_format in self._cache:
                self._cache.move_to_end(response_format)
                error = self._cache[response_format]
            else:
                error = self._compile(response_format)
                self._cache[response_format] = error
                if len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
        if error is not None:
            raise InvalidRequest(f"response_format: the grammar engine refuses this schema: {error}")

    def _compile(self, response_format: str) -> str | None:
        if self.unavailable is not None:
            return None  # the static bounds still apply; logged once when found
        process = self._worker()
        if process is None:
            return None
        started = time.monotonic()
        try:
            process.stdin.write(response_format.replace("\n", " ") + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], self.timeout_s)
            line = process.stdout.readline() if ready else None
        except (BrokenPipeError, OSError):
            line = ""
        if line:
            return json.loads(line)["error"]
        self.stop()
        if line is None:
            log.warning("grammar compile over %.0f s; worker ended", self.timeout_s)
            return f"compiling it takes more than {self.timeout_s:g} s (GRAMMAR_CHECK_TIMEOUT_S)"
        log.warning("grammar compile ended its worker after %.1f s (memory limit %d MB)",
                    time.monotonic() - started, self.memory_mb)
        return f"compiling it needs more than {self.memory_mb} MB (GRAMMAR_CHECK_MEMORY_MB)"

    def _worker(self) -> subprocess.Popen | None:
        if self._process is not None and self._process.poll() is None:
            return self._process
        process = subprocess.Popen([python_executable(), str(WORKER)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            process.stdin.write(json.dumps({**self.setup, "memory_mb": self.memory_mb}) + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], 60)
            answer = json.loads(process.stdout.readline() or "{}") if ready else {}
        except (OSError, ValueError) as exc:
            answer = {"unavailable": f"the worker did not start ({exc})"}
        if not answer.get("ready"):
            self.unavailable = answer.get("unavailable", "the worker did not start")
            log.warning("no sandboxed grammar check (%s); schemas get the static bounds only", self.unavailable)
            process.kill()
            process.wait()
            return None
        self._process = process
        return process

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass

