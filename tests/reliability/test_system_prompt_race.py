"""System-prompt updates racing with batches: every request uses one prompt, never a mix.

Each batch is 520 copies of one question (two ensemble chunks of at most 512) through
/predict, which uses the shim's system prompt; the generator counts the prompt tokens it
was sent. With system prompts A and B of different token lengths, a batch that used only
A adds 520 x len(A), only B 520 x len(B), and one that mixed them lands between the two.
The batches go one after another, each counted alone (its answers' figures awaited before
the next), while a thread flips the prompt the whole time: a sum over concurrent batches
could hide two half-mixed batches that add up to whole ones.
"""
from __future__ import annotations

import threading

import pytest

from ..conftest import over_replicas, scrape_metrics
from ..test_metrics import scrape_until

pytestmark = pytest.mark.server

ROWS = 520
BATCHES = 6
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

    finished = "llm_generator_e2e_latency_seconds_count"

    def one_batch() -> int:
        """The prompt tokens the generator was sent for one batch (its answers' figures are
        applied after the reply: wait for all of them)."""
        before = over_replicas(scrape_metrics(server.metrics_url))
        status, body = server.post("/predict", {"prompt": [QUESTION] * ROWS, "max_new_tokens": 1}, timeout=300)
        assert status == 200 and len(body["response"]) == ROWS, (status, str(body)[:300])
        after = scrape_until(server.metrics_url, lambda m: m[finished] - before[finished] >= ROWS)
        assert after[finished] - before[finished] == ROWS
        return after["llm_generator_prompt_tokens_total"] - before["llm_generator_prompt_tokens_total"]

    try:
        tokens_a, tokens_b = prompt_tokens_with(server, PROMPT_A), prompt_tokens_with(server, PROMPT_B)
        assert tokens_a != tokens_b
        flipper = threading.Thread(target=flip)
        flipper.start()
        try:
            sent = [one_batch() for _ in range(BATCHES)]
        finally:
            stop.set()
            flipper.join()
    finally:
        server.post("/system_prompt", {"system_prompt": original})
    assert updates > 10, "the updates did not overlap the batches"
    assert set(sent) <= {ROWS * tokens_a, ROWS * tokens_b}, (sent, tokens_a, tokens_b)
