"""Fault injection for one test server (tests/test_replicas.py). Python loads this module at
start-up: the shim through PYTHONPATH, Triton's stubs and the engine processes through the
overlay environment of tests/faults/overlay.py (the stubs ignore PYTHONPATH). Nothing here
runs in a shipped server.

The faults, each raised where a bug would raise it:
- in the shim: /info with the header `x-inject-fault` raises a RuntimeError inside the route;
- in the generator: a prompt sampled with seed FAULT_SEED raises a RuntimeError inside the
  vLLM runner's generation, after the request reached the engine's side.
Each module is patched right after its first import (an import hook), so a process that
never imports it pays nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def fault_in_the_shim(module) -> None:
    real = module.shim_state

    def shim_state(request):
        if "x-inject-fault" in request.headers:
            raise RuntimeError("injected fault in the shim")
        return real(request)

    module.shim_state = shim_state


FAULT_SEED = 987_654_321


def fault_in_the_generator(module) -> None:
    real = module.VllmRunner._generate_one

    async def generate_one(self, token_ids, params, *args, **kwargs):
        if params.seed == FAULT_SEED:
            raise RuntimeError("injected fault in the generator")
        return await real(self, token_ids, params, *args, **kwargs)

    module.VllmRunner._generate_one = generate_one


PATCHES = {"shim.routes.admin": fault_in_the_shim, "preprocess.engine.vllm_runner": fault_in_the_generator}


class PatchAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            PATCHES[name](module)

        spec.loader.exec_module = exec_module
        return spec


if __name__ == "sitecustomize":  # armed only when Python loads it at start-up, not when a test imports FAULT_SEED
    sys.meta_path.insert(0, PatchAfterImport())
