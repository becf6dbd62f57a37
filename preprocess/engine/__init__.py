"""The generator's engine, independent of Triton: the runner contract and its two
backends (vLLM, transformers as the last resort), the fallback chain that brings vLLM up,
the engine settings, the service that chooses and rebuilds the backend, and its metrics.

`model_repository/generator/1/model.py` is the only Triton code that uses it.
"""
