"""Fault injection for one test server's shim (tests/test_replicas.py), loaded by Python at
start-up through PYTHONPATH. Nothing here runs in a shipped server.

The fault: /info with the header `x-inject-fault` raises a RuntimeError inside the route, as
a bug would. The module is patched right after its first import (an import hook), so a
process that never imports it pays nothing. Triton's stubs start isolated (`sys.flags.isolated`
is 1 there, and the processes they spawn inherit `-I`), so PYTHONPATH cannot reach the
generator: its internal errors are covered by unit tests, not by this server.
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


PATCHES = {"shim.routes.admin": fault_in_the_shim}


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


sys.meta_path.insert(0, PatchAfterImport())
