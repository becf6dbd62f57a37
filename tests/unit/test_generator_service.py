"""Backend choice of the generator: vLLM, the fallback to transformers, FORCE_VLLM."""
import pytest

import preprocess.vllm_runner as vllm_runner
from preprocess import engine_config
from preprocess.fallback import EngineStartError
from preprocess.generator_service import GeneratorService


def service(tiny_model, **env):
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}
    return GeneratorService(environ, tiny_model)


@pytest.fixture
def vllm_fails(monkeypatch):
    """Fault injection: the vLLM start raises what the chain raises when it gives up."""
    def failing(*args, **kwargs):
        raise EngineStartError("ValueError: No available memory for the cache blocks.")
    monkeypatch.setattr(vllm_runner, "VllmRunner", failing)


def test_vllm_failure_falls_back_to_transformers(tiny_model, vllm_fails, caplog):
    with caplog.at_level("WARNING"):
        s = service(tiny_model)
    try:
        assert s.runner.backend == "transformers"
        assert "falling back to transformers" in caplog.text and "No available memory" in caplog.text
    finally:
        s.shutdown(5)


def test_force_vllm_fails_the_load_with_the_root_cause(tiny_model, vllm_fails):
    with pytest.raises(RuntimeError, match=r"^FORCE_VLLM=1 and vLLM did not start: ValueError: No available memory"):
        service(tiny_model, FORCE_VLLM="1")


def test_use_vllm_false_serves_with_transformers(tiny_model):
    s = service(tiny_model, USE_VLLM="false")
    try:
        assert s.runner.backend == "transformers" and s.info()["backend"] == "transformers"
    finally:
        s.shutdown(5)


def test_no_c_compiler_skips_vllm_unless_forced(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(engine_config, "has_c_compiler", lambda: False)
    with caplog.at_level("INFO"):
        s = service(tiny_model)
    try:
        assert s.runner.backend == "transformers"
        assert "no C compiler" in caplog.text
    finally:
        s.shutdown(5)
    use, _ = engine_config.should_try_vllm(engine_config.load_engine({"FORCE_VLLM": "1"}), True, False, False)
    assert use


def test_use_vllm_auto_needs_an_accelerator():
    settings = engine_config.load_engine({"USE_VLLM": "auto"})
    assert engine_config.should_try_vllm(settings, True, True, accelerator=False)[0] is False
    assert engine_config.should_try_vllm(settings, True, True, accelerator=True)[0] is True


def test_real_vllm_rejects_a_load_format_and_the_chain_recovers(tiny_model, caplog):
    """Real vLLM, real error: `awq` weights do not exist for this model; the retry without it serves."""
    with caplog.at_level("WARNING"):
        s = service(tiny_model, VLLM_LOAD_FORMAT="awq")
    try:
        assert s.runner.backend == "vllm"
        assert "load_format" not in s.runner.engine_kwargs
        assert "load_format='awq' rejected" in caplog.text
    finally:
        s.shutdown(10)
