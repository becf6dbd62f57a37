"""Backend choice of the generator: vLLM, the fallback to transformers, FORCE_VLLM; engine rebuilds."""
import dataclasses
import threading
import time

import psutil
import pytest
import vllm

import preprocess.engine.vllm_runner as vllm_runner
from preprocess.engine import config as engine_config
from preprocess.engine_settings import load_engine
from preprocess.engine.fallback import EngineStartError
from preprocess.engine.service import GeneratorService, prepare_generator_process
from preprocess.engine.versions import UnsupportedVllm

pytestmark = pytest.mark.engine  # real vLLM engines started and refused


def service(tiny_model, **env):
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1", "MODEL_DIR": str(tiny_model), **env}
    return GeneratorService(prepare_generator_process(environ))


@pytest.fixture
def vllm_fails(monkeypatch):
    """Fault injection: the vLLM start raises what the chain raises when it gives up."""
    def failing(*args, **kwargs):
        raise EngineStartError("ValueError: No available memory for the cache blocks.")
    monkeypatch.setattr(vllm_runner, "VllmRunner", failing)


def test_vllm_failure_falls_back_to_transformers_loudly(tiny_model, vllm_fails, caplog):
    with caplog.at_level("INFO"):
        s = service(tiny_model)
    try:
        assert s.replicas[0].runner.backend == "transformers"
        slow = [r for r in caplog.records if r.levelname == "ERROR" and "SLOW" in r.getMessage()]
        assert len(slow) == 1 and "\n" not in slow[0].getMessage(), caplog.text
        assert "instead of vLLM (vLLM did not start: ValueError: No available memory" in slow[0].getMessage()
        assert s.info()["engine_fallback"] == "vLLM did not start: ValueError: No available memory for the cache blocks."
        assert f"vLLM {vllm.__version__} (supported: >=0.25.0,<0.33)" in caplog.text  # the version, at start
    finally:
        s.shutdown(5)


def test_transformers_by_choice_is_no_fallback(tiny_model, caplog):
    s = service(tiny_model, USE_VLLM="false")
    try:
        assert s.info()["backend"] == "transformers" and s.info()["engine_fallback"] is None
        assert "SLOW" not in caplog.text
    finally:
        s.shutdown(5)


def test_an_unsupported_vllm_stops_start_up_in_one_line(tiny_model, monkeypatch, vllm_fails):
    monkeypatch.setattr(vllm, "__version__", "0.24.1")  # fault injection: what an older image has
    with pytest.raises(UnsupportedVllm) as failure:
        service(tiny_model)
    assert str(failure.value) == ("vLLM 0.24.1 is not supported (supported: >=0.25.0,<0.33); install a supported "
                                  "release, or set ALLOW_UNSUPPORTED_VLLM=1 to start anyway")


def test_allow_unsupported_vllm_starts_anyway(tiny_model, monkeypatch, vllm_fails, caplog):
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with caplog.at_level("INFO"):
        s = service(tiny_model, ALLOW_UNSUPPORTED_VLLM="1")
    try:
        assert "vLLM 0.40.0 is outside the supported range >=0.25.0,<0.33; starting anyway" in caplog.text
        assert s.info()["vllm_version"] == "0.40.0"
    finally:
        s.shutdown(5)


def test_force_vllm_fails_the_load_with_the_root_cause(tiny_model, vllm_fails):
    with pytest.raises(RuntimeError, match=r"^FORCE_VLLM=1 and vLLM did not start: ValueError: No available memory"):
        service(tiny_model, FORCE_VLLM="1")


def test_force_vllm_fails_on_a_real_vllm_error(tiny_model):
    """No double: vLLM itself refuses `awq` for a model without awq weights."""
    with pytest.raises(RuntimeError, match=r"^FORCE_VLLM=1 and vLLM did not start: ValidationError: .*awq"):
        service(tiny_model, FORCE_VLLM="1", VLLM_QUANTIZATION="awq")


def test_use_vllm_false_serves_with_transformers(tiny_model):
    s = service(tiny_model, USE_VLLM="false")
    try:
        assert s.replicas[0].runner.backend == "transformers" and s.info()["backend"] == "transformers"
    finally:
        s.shutdown(5)


def test_no_c_compiler_skips_vllm_unless_forced(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(engine_config, "has_c_compiler", lambda: False)
    with caplog.at_level("INFO"):
        s = service(tiny_model)
    try:
        assert s.replicas[0].runner.backend == "transformers"
        assert "no C compiler" in caplog.text
    finally:
        s.shutdown(5)
    use, _ = engine_config.should_try_vllm(load_engine({"FORCE_VLLM": "1"}), True, False, False)
    assert use


def test_use_vllm_auto_needs_an_accelerator():
    settings = load_engine({"USE_VLLM": "auto"})
    assert engine_config.should_try_vllm(settings, True, True, accelerator=False)[0] is False
    assert engine_config.should_try_vllm(settings, True, True, accelerator=True)[0] is True


def test_real_vllm_rejects_a_load_format_and_the_chain_recovers(tiny_model, caplog):
    """Real vLLM, real error: `awq` weights do not exist for this model; the retry without it serves."""
    with caplog.at_level("WARNING"):
        s = service(tiny_model, VLLM_LOAD_FORMAT="awq", VLLM_MAX_NUM_SEQS="24", VLLM_STREAM_INTERVAL="4")
    try:
        assert s.replicas[0].runner.backend == "vllm"
        # The environment's scheduler setting wins over the device defaults, and /info shows it.
        assert s.replicas[0].runner.scheduler["max_num_seqs"] == 24 and s.info()["scheduler"]["max_num_seqs"] == 24
        assert "load_format" not in s.replicas[0].runner.engine_kwargs
        # vLLM's own Prometheus recorder (nothing serves it in the stub) is the silent stand-in
        loggers = [type(logger).__name__ for logger in s.replicas[0].runner.engine.logger_manager.stat_loggers]
        assert "Unscraped" in loggers and "PrometheusStatLogger" not in loggers, loggers
        assert "load_format='awq' rejected" in caplog.text
        check_sampling_params(s.replicas[0].runner)
        check_a_stream_comes_in_pieces_of_the_interval(s.replicas[0].runner)
        check_a_failing_prompt_cancels_its_siblings(s.replicas[0].runner)
        check_a_runner_shut_down_answers_what_it_held(s.replicas[0].runner)  # last: the runner is gone after it
    finally:
        s.shutdown(10)


def check_a_runner_shut_down_answers_what_it_held(runner):
    """When an engine dies, its errors reach the requests' tasks on the runner's loop, but the
    replica's rebuild may stop that loop first: those tasks never run again. Injected here
    by stopping the loop while a batch and a stream still have hundreds of tokens to make.
    Each must get one answer at once, EngineUnavailable (a 503: retry), never a client left
    waiting; cancelling one afterwards (its client gone) is harmless."""
    from preprocess.engine.generation import EngineUnavailable, GenerationItem
    from preprocess.sampling import SamplingSettings

    long = SamplingSettings(max_tokens=900, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                            frequency_penalty=0.0, ignore_eos=True)
    outcomes, stream_errors = [], []
    handle = runner.submit([GenerationItem([1, 2, 3], long), GenerationItem([4, 5], long)], outcomes.append)
    runner.stream(GenerationItem([6, 7], long),
                  lambda event: isinstance(event, Exception) and stream_errors.append(event))
    runner._stop_loop(timeout_s=5)  # the fault: the loop stops with both in flight
    assert len(outcomes) == 1 and isinstance(outcomes[0], EngineUnavailable), outcomes
    assert len(stream_errors) == 1 and isinstance(stream_errors[0], EngineUnavailable), stream_errors
    runner.cancel(handle)
    runner.shutdown(timeout_s=5)
    assert len(outcomes) == 1 and len(stream_errors) == 1


def check_a_stream_comes_in_pieces_of_the_interval(runner):
    """VLLM_STREAM_INTERVAL=4 reaches vLLM: after the first token, a piece every 4 tokens (or
    fewer pieces, when the reader falls behind), the last one at once; the pieces together
    are the answer the same settings give whole."""
    from preprocess.engine.generation import GenerationItem
    from preprocess.sampling import SamplingSettings

    assert runner.engine.vllm_config.scheduler_config.stream_interval == 4
    settings = SamplingSettings(max_tokens=10, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                frequency_penalty=0.0, ignore_eos=True)
    pieces, whole, ended = [], [], threading.Event()

    def on_piece(event):
        pieces.append(event)
        if isinstance(event, Exception) or event.finish_reason is not None:
            ended.set()

    def on_whole(outcome):
        whole.append(outcome)
        ended.set()

    runner.stream(GenerationItem([1, 2, 3], settings), on_piece)
    assert ended.wait(120) and not any(isinstance(p, Exception) for p in pieces), pieces
    ended.clear()
    runner.submit([GenerationItem([1, 2, 3], settings)], on_whole)
    assert ended.wait(120) and not isinstance(whole[0], Exception), whole
    assert [p.tokens for p in pieces][0] == 1 and sum(p.tokens for p in pieces) == 10
    assert len(pieces) <= 4, [p.tokens for p in pieces]  # 1 + 4 + 4 + 1; one a token would be 10
    assert "".join(p.text for p in pieces) == whole[0][0].text


def check_a_failing_prompt_cancels_its_siblings(runner):
    """A prompt the engine refuses (a token id outside the vocabulary) fails its request
    once, and its sibling, 500 tokens long, is aborted in vLLM rather than left running."""
    from preprocess.engine.generation import GenerationItem
    from preprocess.sampling import SamplingSettings

    long = SamplingSettings(max_tokens=500, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                            frequency_penalty=0.0, ignore_eos=True)
    outcomes, done = [], threading.Event()

    def on_done(outcome):
        outcomes.append(outcome)
        done.set()

    runner.submit([GenerationItem([1, 2, 3], long), GenerationItem([10**7], long)], on_done)
    assert done.wait(120)
    assert len(outcomes) == 1 and isinstance(outcomes[0], Exception)
    assert runner.engine.output_processor.get_num_unfinished_requests() == 0


def check_sampling_params(runner):
    """Stops apply unless ignore_eos (exactly max_tokens, as the benchmarks count); equal
    settings share one cached SamplingParams."""
    from preprocess.sampling import SamplingSettings

    settings = SamplingSettings(max_tokens=4, temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                frequency_penalty=0.0)
    params = runner.sampling_params(settings)
    # Both default stop strings are special tokens of this tokenizer: stopped by id, no text search.
    assert params.stop == [] and set(params.stop_token_ids) >= {0, 2}
    assert runner.sampling_params(dataclasses.replace(settings)) is params
    forced = runner.sampling_params(dataclasses.replace(settings, ignore_eos=True))
    assert forced.ignore_eos and not forced.stop and not forced.stop_token_ids and forced.max_tokens == 4


def test_failed_engine_starts_leak_no_thread(tiny_model, monkeypatch):
    """VllmRunner starts its loop thread before the engine; a failed start must stop it."""
    def failing(*args, **kwargs):
        raise EngineStartError("ValueError: No available memory for the cache blocks.")

    monkeypatch.setattr(vllm_runner, "build_with_fallbacks", failing)
    settings = load_engine({"VLLM_CPU_KVCACHE_SPACE": "1"}, cpu_only=True)
    before = set(threading.enumerate())
    for _ in range(5):
        with pytest.raises(EngineStartError):
            vllm_runner.VllmRunner(settings, str(tiny_model), [], [])
    # By identity, not by count: a thread of an earlier test may end meanwhile (CI saw 3 == 4).
    assert [t.name for t in set(threading.enumerate()) - before] == []
    assert not [t for t in threading.enumerate() if t.name == "vllm-loop"]


class DeadRunner:
    """Fault injection: the engine process is gone (what vLLM's `errored` reports)."""
    backend = "vllm"
    healthy = False
    engine_mode, engine_kwargs, scheduler = "DeadRunner", {}, {}
    max_model_len = 1024

    def shutdown(self, timeout_s):
        pass


def test_a_rebuild_that_keeps_failing_backs_off_with_flat_threads_and_memory(tiny_model, monkeypatch):
    def failing(*args, **kwargs):
        raise EngineStartError("ValueError: No available memory for the cache blocks.")

    monkeypatch.setattr(vllm_runner, "build_with_fallbacks", failing)
    monkeypatch.setattr(GeneratorService, "retry_first_s", 0.05)
    monkeypatch.setattr(GeneratorService, "retry_max_s", 0.4)
    s = service(tiny_model, USE_VLLM="false")
    try:
        s.engine = dataclasses.replace(s.engine, use_vllm="true", force_vllm=True)  # every rebuild fails
        replica = s.replicas[0]
        replica.runner = DeadRunner()
        process = psutil.Process()
        threads, rss = [], []
        deadline = time.monotonic() + 120
        while len(replica.rebuild_delays) < 8 and time.monotonic() < deadline:
            threads.append(threading.active_count())
            rss.append(process.memory_info().rss)
            time.sleep(0.3)
        assert len(replica.rebuild_delays) >= 8, replica.rebuild_delays
        assert replica.rebuild_delays[:5] == [0.05, 0.1, 0.2, 0.4, 0.4]  # doubles, then capped
        assert not s.ready and s.info()["ready"] is False
        # an attempt runs a loop thread while it lasts: a leak shows as a floor that rises
        assert min(threads[len(threads) // 2:]) <= threads[0]
        assert rss[-1] - rss[len(rss) // 2] < 30 * 2**20
    finally:
        s._stop.set()


def test_engine_stats_off_passes_no_logger():
    """VLLM_ENGINE_STATS=0: vLLM's statistics off, and no logger of ours turns them back on."""
    from preprocess.engine.metrics import KvCacheGauge, engine_stat_loggers

    off = load_engine({"VLLM_ENGINE_STATS": "0"})
    assert engine_stat_loggers(off.engine_stats, KvCacheGauge()) == []
    assert engine_config.engine_kwargs(off, "/m")["disable_log_stats"] is True
    on = load_engine({})
    assert [f.__name__ for f in engine_stat_loggers(on.engine_stats, None)] == ["Unscraped"]
    assert [f.__name__ for f in engine_stat_loggers(on.engine_stats, KvCacheGauge())] == ["Unscraped", "Recorder"]
    assert engine_config.engine_kwargs(on, "/m")["disable_log_stats"] is False


def test_which_failures_are_sent_again():
    import asyncio

    from preprocess.engine.generation import EngineUnavailable, PromptTooLong
    from preprocess.engine.service import died_under

    assert died_under(EngineUnavailable("the engine stopped"), engine_healthy=False)
    assert died_under(type("EngineDeadError", (RuntimeError,), {})("gone"), engine_healthy=True)
    assert died_under(asyncio.CancelledError(), engine_healthy=False)  # the loop stopped under it
    assert not died_under(asyncio.CancelledError(), engine_healthy=True)  # its client left: never again
    assert not died_under(PromptTooLong("too long"), engine_healthy=False)  # the request's own fault
    assert not died_under(ValueError("a bug"), engine_healthy=True)
    assert not died_under([], engine_healthy=False)  # an answer
