"""System-prompt updates racing with batches: every request uses one prompt, never a mix.

Each batch is 520 copies of one question (two ensemble chunks of at most 512) through
/v1/completions, which uses the shim's system prompt and reports the summed prompt tokens.
With system prompts A and B of different token lengths, a batch that used only A sums to
520 x len(A), only B to 520 x len(B); any mix lands strictly in between.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.server

ROWS = 520
QUESTION = "What is a warp?"
PROMPT_A = "Answer briefly."
PROMPT_B = "Answer briefly, in plain words, as a teacher who explains GPU programming to a new student."


def prompt_tokens_with(server, system_prompt: str) -> int:
    assert server.post("/system_prompt", {"system_prompt": system_prompt})[0] == 200
    status, body = server.post("/explain", {"prompt": QUESTION})
    assert status == 200
    return body["prompt_tokens"]


def test_updates_during_batches_never_mix_prompts(server):
    original = server.get("/system_prompt")[1]["system_prompt"]
    stop = threading.Event()
    updates = 0

    def flip():
        nonlocal updates
        while not stop.is_set():
            server.post("/system_prompt", {"system_prompt": (PROMPT_A, PROMPT_B)[updates % 2]})
            updates += 1

    def batch(_):
        status, body = server.post("/v1/completions", {"prompt": [QUESTION] * ROWS, "max_tokens": 1}, timeout=300)
        assert status == 200 and len(body["choices"]) == ROWS, (status, str(body)[:300])
        return body["usage"]["prompt_tokens"]

    try:
        tokens_a, tokens_b = prompt_tokens_with(server, PROMPT_A), prompt_tokens_with(server, PROMPT_B)
        assert tokens_a != tokens_b
        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            with ThreadPoolExecutor(3) as pool:
                totals = list(pool.map(batch, range(6)))
        finally:
            stop.set()
            flipper.join()
    finally:
        server.post("/system_prompt", {"system_prompt": original})
    assert updates > 10, "the updates did not overlap the batches"
    assert set(totals) <= {ROWS * tokens_a, ROWS * tokens_b}, (totals, tokens_a, tokens_b)
