"""Shim features against the session's real server: /info, system prompt, batch health."""
from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from preprocess.settings import SYSTEM_PROMPT_MAX_CHARS, load, load_sampling
from shim.app import create_app

from .conftest import LEAK_CANARY, TINY_ANSWER, warmed

pytestmark = pytest.mark.server


def test_info_names_backend_model_and_settings_without_secrets(server, tiny_model):
    status, info = server.get("/info")
    assert status == 200
    assert info["backend"] == "vllm" and info["engine_mode"] == "AsyncLLM"
    assert info["frontend"] == "thread" and info["replicas"][0]["frontend_pid"] is None  # one replica: in the stub
    assert info["model_dir"] == str(tiny_model)
    assert info["engine_args"]["model"] == str(tiny_model)
    assert info["routing"]["max_new_tokens"] == 8
    assert info["sampling_defaults"] == dataclasses.asdict(load_sampling(server.env)) | \
        {"stop_strings": list(load_sampling(server.env).stop_strings)}
    text = json.dumps(info)
    assert LEAK_CANARY not in text and "HF_TOKEN" not in text and "OPENAI_API_KEY" not in text
    assert LEAK_CANARY not in server.log_text()


def test_system_prompt_over_the_limit_is_refused_not_cut(server):
    before = server.get("/system_prompt")[1]["system_prompt"]
    limit = SYSTEM_PROMPT_MAX_CHARS  # the replaced service's limit
    status, body = server.post("/system_prompt", {"system_prompt": "长" * (limit + 1)})
    assert status == 422 and str(limit) in body["error"]
    assert server.get("/system_prompt")[1]["system_prompt"] == before
    # At the character limit, but longer than the tiny model: refused too, by the model length.
    status, body = server.post("/system_prompt", {"system_prompt": "长" * limit})
    assert status == 422 and "model length" in body["error"]
    assert server.get("/system_prompt")[1]["system_prompt"] == before
    status, body = server.post("/system_prompt", {"system_prompt": "长" * 100})
    assert status == 200 and len(body["system_prompt"]) == 100
    assert server.post("/system_prompt", {"system_prompt": 5})[0] == 422
    server.post("/system_prompt", {"system_prompt": before})


def test_system_prompt_takes_effect_on_the_next_request(server):
    """The answer itself shows which system prompt a request used. The question is sized so
    that under the longer prompt B only 3 tokens of the tiny model's length are left (vLLM
    stops there: 3 words), while under A the answer gets all 8 of MAX_NEW_TOKENS."""
    from .conftest import TINY_MODEL_LEN

    prompt_a, prompt_b = "Answer briefly.", "你是一个非常详细的老师，请用很长的篇幅回答每一个问题。"
    original = server.get("/system_prompt")[1]["system_prompt"]

    def use(system):
        assert server.post("/system_prompt", {"system_prompt": system})[0] == 200

    def tokens(question):
        return server.post("/explain", {"prompt": question})[1]["prompt_tokens"]

    try:
        use(prompt_b)
        one, two = tokens("q why"), tokens("q why why")
        assert two - one == 1  # one token per " why"
        question = "q" + " why" * (TINY_MODEL_LEN - 3 - (one - 1))
        assert tokens(question) == TINY_MODEL_LEN - 3
        use(prompt_a)
        assert tokens(question) <= TINY_MODEL_LEN - 8 - 3
        for system, words in ((prompt_a, 8), (prompt_b, 3), (prompt_a, 8)):
            use(system)
            assert server.post("/predict", {"prompt": [question]}) == (200, {"response": [(TINY_ANSWER * words).strip()]})
    finally:
        server.post("/system_prompt", {"system_prompt": original})


def test_batch_mode_is_read_at_each_request(server):
    """The real app in-process, on the session's tritonserver, with a live environment."""
    environ = {"TRITON_HTTP_PORT": server.env["TRITON_HTTP_PORT"], "WARMUP_NUM_SAMPLES": "0",
               "MODEL_DIR": server.env["MODEL_DIR"]}
    app = create_app(load(environ), live_environ=environ)
    with TestClient(app) as client:
        warmed(client)  # the app warms up through the ensemble first
        assert client.get("/").json() == {"status": "ok"}
        environ["BATCH_MODE"] = "1"
        assert client.get("/").json() == {"status": "batch"}
        environ["BATCH_MODE"] = "off"
        assert client.get("/").json() == {"status": "ok"}


def test_start_up_is_never_silent_for_long(server):
    """Engine load and warm-up print progress lines (shim.progress.Heartbeat)."""
    log_text = server.log_text()
    assert "waiting for the model server:" in log_text
    assert "warm-up (" in log_text and "done in" in log_text
    assert "ready: warm-up took" in log_text


def test_info_shows_the_effective_scheduler_from_the_device_defaults(server):
    """No VLLM_MAX_NUM_* set: the engine runs with vLLM's offline (`LLM`) defaults for this
    device, read from vLLM itself, not copied here."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    batched, seqs = AsyncEngineArgs.get_batch_defaults(world_size=1)
    scheduler = server.get("/info")[1]["scheduler"]
    assert scheduler["defaults"] == "offline"
    assert scheduler["max_num_seqs"] == seqs[UsageContext.LLM_CLASS]
    assert scheduler["max_num_batched_tokens"] == batched[UsageContext.LLM_CLASS]
    assert scheduler["kv_cache_blocks"] > 0 and scheduler["max_concurrency_at_max_len"] > 0


def test_the_engine_samples_with_the_generators_penalties(server):
    """VLLM_FAST_PENALTIES defaults on without a GPU: vLLM loaded the plugin (pyproject's
    entry point, named in VLLM_PLUGINS) in the process that built the engine, so its sampler
    calls preprocess/engine/penalties.py. An uninstalled entry point or an unnamed plugin fails."""
    assert server.get("/info")[1]["scheduler"]["penalties"] == "seen tokens"


def test_info_lists_the_limits_a_client_meets(server):
    limits = server.get("/info")[1]["limits"]
    assert limits["max_request_tokens"] == int(server.env["SHIM_MAX_REQUEST_TOKENS"])
    assert limits["max_queued_tokens"] == int(server.env["SHIM_MAX_QUEUED_TOKENS"])
    assert limits["grammar_check_memory_mb"] == 1024 and limits["grammar_check_timeout_s"] == 5.0
    assert limits["header_timeout_s"] == float(server.env["SHIM_HEADER_TIMEOUT_S"])
