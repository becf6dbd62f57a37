"""End to end through the real server: shim -> tritonserver ensemble -> vLLM (CPU)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from shim.ensemble import build_inputs

from .conftest import REPO, TINY_ANSWER
from .bench.perf_tools import perf_analyzer_command, perf_analyzer_env

pytestmark = pytest.mark.server


def infer(triton, model, prompts, **overrides):
    return triton.infer(model, build_inputs(prompts, None, overrides))


def test_health_goes_from_warming_to_ok(server):
    seen = [s for s in server.statuses_seen if s != "unreachable"]
    assert seen[0] == "warming", seen
    assert seen[-1] == "ok"
    assert server.statuses_seen.index("warming") < server.statuses_seen.index("ok")


def test_string_in_string_out(server):
    status, body = server.post("/predict", {"prompt": "What is a CUDA kernel?"})
    assert status == 200
    assert isinstance(body["response"], str) and body["response"]


def test_list_of_one_stays_a_list(server):
    status, body = server.post("/predict", {"prompt": ["What is a warp?"]})
    assert status == 200
    assert isinstance(body["response"], list) and len(body["response"]) == 1


def test_list_of_64_comes_back_in_order(server, triton):
    prompts = [f"question {i}: " + "why " * i for i in range(64)]
    # The ensemble keeps rows in order: prompt lengths grow with i.
    direct = infer(triton, "llm", prompts)
    lengths = direct.as_numpy("prompt_tokens").reshape(-1).tolist()
    assert lengths == sorted(lengths) and len(set(lengths)) == 64
    # The shim returns the same 64 answers, in the same order.
    status, body = server.post("/predict", {"prompt": prompts})
    assert status == 200 and len(body["response"]) == 64
    expected = [a.decode() for a in direct.as_numpy("answer").reshape(-1)]
    assert body["response"] == expected and all(TINY_ANSWER.strip() in a for a in expected)



def test_each_row_of_a_list_gets_its_own_answer_in_order(server, triton):
    """Rows whose answers differ, so order is visible in the text itself: the tiny model says
    one word per token to any prompt, and a prompt that ends k tokens short of the model's
    length gets an answer of exactly k words (vLLM stops at the length)."""
    from .conftest import TINY_MODEL_LEN

    def question(words: int) -> str:
        return "q" + " why" * words

    def length(words: int) -> int:
        return int(infer(triton, "llm", [question(words)], max_new_tokens=1).as_numpy("prompt_tokens").reshape(-1)[0])

    one, two = length(1), length(2)
    assert two - one == 1  # one token per " why", so a prompt's length is chosen exactly
    base = one - 1
    room = [3, 7, 1, 8, 5, 2, 6, 4]  # the answer's length, in tokens, per row (MAX_NEW_TOKENS is 8)
    prompts = [question(TINY_MODEL_LEN - k - base) for k in room]
    status, body = server.post("/predict", {"prompt": prompts})
    assert status == 200
    assert body["response"] == [(TINY_ANSWER * k).strip() for k in room], body["response"]

def test_a_list_in_several_chunks_is_reassembled_in_order(server):
    """The shim's own client, cutting 10 prompts into chunks of 4 (3 concurrent requests):
    prompt lengths grow with the index, so the token counts show the order."""
    import asyncio

    from shim.ensemble import EnsembleClient

    prompts = [f"question {i}: " + "why " * i for i in range(10)]
    client = EnsembleClient(server.triton_url, max_batch_size=4)
    answers = asyncio.run(client.generate(prompts, None, {"max_new_tokens": 2, "ignore_eos": True}))
    lengths = [a.prompt_tokens for a in answers]
    assert len(answers) == 10 and lengths == sorted(lengths) and len(set(lengths)) == 10
    assert [a.completion_tokens for a in answers] == [2] * 10
    assert [a.text for a in answers] == [(TINY_ANSWER * 2).strip()] * 10


def test_max_new_tokens_override_gives_one_token(server, triton, tokenizer):
    result = infer(triton, "llm", ["Tell me a long story about GPUs"], max_new_tokens=1, ignore_eos=True)
    assert result.as_numpy("completion_tokens").reshape(-1).tolist() == [1]
    status, body = server.post("/predict", {"prompt": "Tell me a long story", "max_new_tokens": 1})
    assert status == 200
    assert tokenizer(body["response"], add_special_tokens=False).input_ids == tokenizer(
        TINY_ANSWER.strip(), add_special_tokens=False).input_ids


def test_stage_times_read_each_stage_of_an_ensemble_request(server, triton):
    """The engine benchmark's per-stage breakdown, from this Triton's own statistics."""
    from tests.bench.clients import model_stats, stage_times

    from .conftest import wait_for

    models = ("llm", "preprocess", "generator", "postprocess")
    before = model_stats(server.triton_url)
    infer(triton, "llm", ["one", "two", "three"], max_new_tokens=1)

    def counted():
        # Triton records a model's statistics as its work completes, which may be just after
        # the client has the answer (CI at 35709e1 read the ensemble's a moment too early).
        now = stage_times(before, model_stats(server.triton_url))
        return now if all(model in now for model in models) else None

    stages = wait_for(counted, 60)
    assert stages, stage_times(before, model_stats(server.triton_url))
    for model in models:
        assert stages[model]["requests"] >= 1, stages
    for model in ("preprocess", "generator", "postprocess"):
        assert stages[model]["executions"] >= 1, stages
        assert all(stages[model][f"{phase}_ms"] >= 0 for phase in ("queue", "compute_input", "compute_infer")), stages
    assert stages["generator"]["compute_infer_ms"] > 0, stages


def test_chinese_and_emoji_pass_through_byte_exact(server, triton, tokenizer):
    question = "请解释 CUDA 的线程块 🚀🔥 — naïve café ✓"
    result = infer(triton, "preprocess", [question])
    prompt_text = result.as_numpy("PROMPT_TEXT").reshape(-1)[0].decode("utf-8")
    assert question in prompt_text
    ids = [int(t) for t in result.as_numpy("PROMPT_IDS").reshape(-1) if t >= 0]
    assert question in tokenizer.decode(ids)
    status, body = server.post("/predict", {"prompt": [question, question]})
    assert status == 200 and len(body["response"]) == 2


def test_system_prompt_round_trip_changes_the_prompt(server, triton):
    original = server.get("/system_prompt")[1]["system_prompt"]
    before = server.post("/explain", {"prompt": "hello"})[1]["prompt"]
    try:
        status, body = server.post("/system_prompt", {"system_prompt": "  只回答要点。  "})
        assert status == 200 and body["system_prompt"] == "只回答要点。"
        assert server.get("/system_prompt") == (200, {"system_prompt": "只回答要点。"})
        after = server.post("/explain", {"prompt": "hello"})[1]["prompt"]
        assert "只回答要点。" in after and "只回答要点。" not in before and original in before
        assert server.post("/predict", {"prompt": "hello"})[0] == 200
    finally:
        assert server.post("/system_prompt", {"system_prompt": original})[0] == 200
    assert server.post("/explain", {"prompt": "hello"})[1]["prompt"] == before


def test_perf_analyzer_runs_against_the_ensemble(server):
    command = perf_analyzer_command(server.triton_url, "2", extra=[
        "--measurement-mode", "count_windows", "--measurement-request-count", "8",
        "--max-trials", "3", "--stability-percentage", "999"])
    run = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_env(), timeout=180)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    throughput = float(run.stdout.split("Throughput:")[1].split()[0])
    assert throughput > 0


@pytest.mark.parametrize("body, status, needle", [
    ({"prompts": "x"}, 422, "prompt"),
    ({"prompt": 42}, 422, "prompt"),
    ({"prompt": ["ok", 7, "fine"]}, 422, "prompt[1]"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"prompt": "x", "top_k": 0}, 400, "top_k"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "frequency_penalty": 9}, 400, "frequency_penalty"),
    ({"prompt": "x", "top_k": 2**32 - 1}, 400, "top_k"),  # would wrap to -1 (no limit) in INT32
    ({"prompt": "x", "temperature": 1e300}, 400, "temperature"),  # inf in FP32
])
def test_bad_input_gets_a_4xx_naming_the_problem(server, body, status, needle):
    got_status, got = server.post("/predict", body)
    assert got_status == status, got
    assert needle in got["error"]
    assert server.post("/predict", {"prompt": "still serving?"})[0] == 200


def test_invalid_json_is_a_400(server):
    status, body = server.post("/predict", b'{"prompt": ')
    assert status == 400 and "invalid JSON" in body["error"]


def test_empty_list_returns_empty_list(server):
    assert server.post("/predict", {"prompt": []}) == (200, {"response": []})


def test_max_new_tokens_is_clipped_not_refused(server, triton):
    assert server.post("/predict", {"prompt": "x", "max_new_tokens": 0}) == (200, {"response": TINY_ANSWER.strip()})
    assert server.post("/predict", {"prompt": "x", "max_new_tokens": 100000})[0] == 200
    result = infer(triton, "preprocess", ["x"], max_new_tokens=100000)
    assert result.as_numpy("MAX_TOKENS").reshape(-1).tolist() == [4096]


def test_perf_data_file_is_valid_for_the_ensemble():
    data = json.loads((REPO / "tests" / "bench" / "perf_data" / "llm_inputs.json").read_text())
    assert all("prompt" in row for row in data["data"])
    assert np.array(data["data"][0]["prompt"]).size == 1
