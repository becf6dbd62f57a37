"""Engines die with their server, however it dies: no process of the old server and no
shared-memory segment it made outlive it. With vLLM (the engine processes are what outlives
a killed stub), after `kill -9` of a plain tritonserver and after Ctrl-C of the serve entry.
"""
from __future__ import annotations

import os
import signal
import sys

import psutil
import pytest

from .conftest import http_json, server_env, start_server, wait_for
from .shm_hygiene import KINDS, names_in_use, shm_names
from .test_replicas import PlainTriton

pytestmark = pytest.mark.server

BOUND_S = 60  # the guard polls each second and gives SIGTERM 5 s; a bound on slow machines, not a wait


def engine_tree(root_pid: int) -> list[psutil.Process]:
    tree = psutil.Process(root_pid).children(recursive=True)
    titles = [" ".join(p.cmdline()) for p in tree]
    assert any("EngineCore" in t for t in titles), titles  # vLLM runs: its engine is in the tree
    assert any("orphan_guard" in t for t in titles), titles
    return tree


def assert_nothing_left(tree: list[psutil.Process], shm_before: set[str]) -> None:
    _, alive = psutil.wait_procs(tree, timeout=BOUND_S)
    assert not alive, [(p.pid, " ".join(p.cmdline())) for p in alive if p.is_running()]

    def orphaned_segments():
        return {n for n in shm_names() - shm_before if n.startswith(KINDS)} - names_in_use()
    assert wait_for(lambda: not orphaned_segments(), 10), sorted(orphaned_segments())


def test_kill_9_of_a_plain_tritonserver_leaves_no_engine_and_no_shared_memory(tiny_model):
    shm_before = shm_names()
    triton = PlainTriton(server_env(tiny_model, USE_VLLM="true"))
    triton.start()
    try:
        ready = f"http://127.0.0.1:{triton.ports[0]}/v2/health/ready"

        def is_ready():
            try:
                return http_json("GET", ready, timeout=2)[0] == 200
            except OSError:
                return False
        assert wait_for(is_ready, 300), "tritonserver never ready"
        tree = engine_tree(triton.process.pid)  # `exec tritonserver`: the shell's pid is tritonserver's
        os.kill(triton.process.pid, signal.SIGKILL)
        # Reaped, as its parent (a shell, tini) would: a zombie parent still answers the stubs'
        # "is my parent alive" check, and they would wait for it forever.
        triton.process.wait(BOUND_S)
        assert_nothing_left(tree, shm_before)
    finally:
        triton.stop()


def test_ctrl_c_of_the_serve_entry_leaves_no_engine_and_no_shared_memory(tiny_model):
    shm_before = shm_names()
    server = start_server(server_env(tiny_model, USE_VLLM="true"), "server-orphans.log",
                          [sys.executable, "-m", "shim.serve"])  # what ./build.sh serve runs
    tree = engine_tree(server.process.pid)
    server.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    server.process.wait(BOUND_S)
    assert_nothing_left(tree, shm_before)
