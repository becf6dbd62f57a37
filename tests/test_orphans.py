"""Engines die with their server, however it dies: no process of the old server and no
shared-memory segment its processes mapped outlive it. With vLLM (the engine processes are what outlives
a killed stub), after Ctrl-C of the serve entry here, and after `kill -9` of a plain
tritonserver at the end of tests/test_replicas.py (its server, two engines).
The server here runs with VLLM_ENGINE_STATS=0 and first answers one request, which shows
the figures that come only from vLLM's per-step statistics staying empty.
"""
from __future__ import annotations

import signal
import sys

import psutil
import pytest

from shim.ensemble import build_inputs

from .conftest import scrape_metrics, server_env, start_server, stop_server, wait_for
from preprocess.engine.orphan_guard import shm_mapped

from .shm_hygiene import KINDS, SHM, names_in_use

pytestmark = pytest.mark.server

BOUND_S = 60  # the guard polls each second and gives SIGTERM 5 s; a bound on slow machines, not a wait


def engine_tree(root_pid: int) -> tuple[list[psutil.Process], set[str]]:
    """The server's processes, the root among them, and the /dev/shm segments they map now.
    Only these are judged: the suite runs two workers, and the other one's servers make and
    drop segments of their own meanwhile."""
    root = psutil.Process(root_pid)
    tree = [root, *root.children(recursive=True)]
    titles = [" ".join(p.cmdline()) for p in tree]
    assert any("EngineCore" in t for t in titles), titles  # vLLM runs: its engine is in the tree
    assert any("orphan_guard" in t for t in titles), titles
    segments = {name for p in tree for name in shm_mapped(p.pid) if name.startswith(KINDS)}
    # Triton's stubs talk to it through such segments: a tree that maps none would make the
    # check below pass by construction.
    assert any(n.startswith("triton_python_backend_shm_region_") for n in segments), sorted(segments)
    return tree, segments


def assert_nothing_left(tree: list[psutil.Process], segments: set[str]) -> None:
    _, alive = psutil.wait_procs(tree, timeout=BOUND_S)
    assert not alive, [(p.pid, " ".join(p.cmdline())) for p in alive if p.is_running()]

    def orphaned_segments():
        return {n for n in segments if (SHM / n).exists()} - names_in_use()
    assert wait_for(lambda: not orphaned_segments(), 10), sorted(orphaned_segments())


def figures_without_engine_stats(server) -> None:
    """docs/operations.md, Metrics: with VLLM_ENGINE_STATS=0, time to first token, the KV
    blocks in use and vLLM's step-by-step figures stay empty, while the generator's own
    counts go on (the positive control; with the statistics on, tests/test_metrics.py sees
    time to first token counted for the same kind of request)."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server.triton_url)
    received, finished = "llm_generator_prompts_total{replica=0}", "llm_generator_e2e_latency_seconds_count{replica=0}"

    def settled(more_than: float = -1):
        """The figures once every prompt received has its answer recorded (the shim's own
        probes included), and more than `more_than` answers are."""
        m = scrape_metrics(server.metrics_url)
        return m if m.get(received, 0) == m.get(finished, 0) > more_than else None

    before = wait_for(settled, 30)
    assert before is not None, "the figures never settled"
    answer = client.infer("llm", build_inputs(["hello"], None, {})).as_numpy("answer").reshape(-1)[0].decode()
    assert answer == " ".join(["GPU"] * 8)  # MAX_NEW_TOKENS of the test servers
    figures = wait_for(lambda: settled(before[finished]), 30)
    assert figures, "the request's figures never arrived"

    def delta(name):
        return figures.get(f"{name}{{replica=0}}", 0) - before.get(f"{name}{{replica=0}}", 0)

    assert delta("llm_generator_prompts_total") == 1 and delta("llm_generator_generation_tokens_total") == 8
    for empty in ("llm_generator_time_to_first_token_seconds_count", "llm_generator_kv_cache_blocks_used",
                  "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total",
                  "llm_generator_engine_requests_finished_total", "llm_generator_engine_decode_seconds_total"):
        assert figures.get(f"{empty}{{replica=0}}", 0) == 0, empty


def test_ctrl_c_of_the_serve_entry_leaves_no_engine_and_no_shared_memory(tiny_model):
    server = start_server(server_env(tiny_model, USE_VLLM="true", VLLM_ENGINE_STATS="0"), "server-orphans.log",
                          [sys.executable, "-m", "shim.serve"])  # what ./build.sh serve runs
    try:
        figures_without_engine_stats(server)
        tree, segments = engine_tree(server.process.pid)
    except BaseException:
        stop_server(server)  # a failed check must not leave a server running for the rest of the session
        raise
    server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    server.process.wait(BOUND_S)
    assert_nothing_left(tree, segments)
