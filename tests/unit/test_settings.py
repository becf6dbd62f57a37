"""Environment parsing: names, defaults, clip ranges and one-line errors (no server)."""
import json
from pathlib import Path

import pytest

from preprocess import settings as cfg
from preprocess.engine.config import choose_vllm_plugins, prepare_process_environment
from preprocess.engine_settings import load_engine
from preprocess.engine.penalties import PLUGIN_NAME
from preprocess.envparse import Env, SettingsError
from preprocess.engine.service import stop_token_ids
from preprocess.sampling import InvalidRequest, resolve
from shim.warmup import load_user_prompts, warmup_prompts


@pytest.mark.parametrize("word", ["1", "true", "yes", "y", "on", "TRUE", " On "])
def test_true_words(word):
    assert Env({"X": word}).bool("X", False) is True


@pytest.mark.parametrize("word", ["0", "false", "no", "n", "off", "OFF"])
def test_false_words(word):
    assert Env({"X": word}).bool("X", True) is False


def test_bad_boolean_names_variable():
    with pytest.raises(SettingsError, match=r"BATCH_MODE='maybe' is not a boolean"):
        cfg.batch_mode({"BATCH_MODE": "maybe"})


@pytest.mark.parametrize("loader, name", [
    (cfg.load_sampling, "TEMPERATURE"), (cfg.load_sampling, "TOP_P"), (cfg.load_sampling, "TOP_K"),
    (cfg.load_cleanup, "OUTPUT_MAX_SENTENCES"), (cfg.load_warmup, "WARMUP_NUM_SAMPLES"),
    (cfg.load_warmup, "WARMUP_REPEAT"), (cfg.load_shim, "PORT"), (load_engine, "GPU_MEMORY_UTILIZATION"),
    (load_engine, "MAX_MODEL_LEN"), (load_engine, "SPEC_NUM_SPECULATIVE_TOKENS"),
])
def test_malformed_numbers_stop_with_one_line(loader, name):
    env = {name: "1.2.3x", "ENABLE_SPECULATIVE_DECODING": "1"}
    with pytest.raises(SettingsError) as info:
        loader(env)
    message = str(info.value)
    assert name in message and "1.2.3x" in message and "\n" not in message


def test_serve_refuses_to_start_on_a_malformed_variable():
    import subprocess
    import sys

    from tests.conftest import REPO

    run = subprocess.run([sys.executable, "-m", "shim.serve"], cwd=REPO, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "MAX_NEW_TOKENS_CODE": "lots"}, timeout=60)
    assert run.returncode == 2
    assert "MAX_NEW_TOKENS_CODE='lots' is not an integer" in run.stderr
    assert "Traceback" not in run.stderr


def test_warmup_defaults():
    """The replaced service's defaults: the prompt 你好, one repeat, up to 64 data samples."""
    warmup = cfg.load_warmup({})
    assert (warmup.prompt, warmup.repeat, warmup.num_samples) == ("你好", 1, 64)


# WARMUP_NUM_SAMPLES is clipped so that a typo cannot push warm-up past the health
# deadline (the replaced service's "defensive cap"); the cap itself is bounded too.
CAP = cfg.WarmupSettings.num_samples_cap
CAP_MAX = cfg.WARMUP_NUM_SAMPLES_CAP_MAX


@pytest.mark.parametrize("env, samples", [
    ({"WARMUP_NUM_SAMPLES": str(CAP)}, CAP),
    ({"WARMUP_NUM_SAMPLES": str(CAP + 1)}, CAP),
    ({"WARMUP_NUM_SAMPLES": "0"}, 0),
    ({"WARMUP_NUM_SAMPLES": "-1"}, 0),
    ({"WARMUP_NUM_SAMPLES": "701", "WARMUP_NUM_SAMPLES_CAP": "700"}, 700),
    ({"WARMUP_NUM_SAMPLES": str(CAP_MAX + 1), "WARMUP_NUM_SAMPLES_CAP": str(CAP_MAX)}, CAP_MAX),
    ({"WARMUP_NUM_SAMPLES": str(CAP_MAX + 1), "WARMUP_NUM_SAMPLES_CAP": str(CAP_MAX + 1)}, CAP_MAX),
])
def test_warmup_samples_are_clipped_at_the_cap(env, samples):
    assert cfg.load_warmup(env).num_samples == samples


@pytest.mark.parametrize("value, repeat", [("0", 1), ("1", 1), ("8", 8), ("9", 8)])
def test_warmup_repeat_is_clipped_to_1_to_8(value, repeat):
    assert cfg.load_warmup({"WARMUP_REPEAT": value}).repeat == repeat


def test_warmup_data_formats(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "问一"}]},
        {"instruction": "问二"}, {"prompt": "问三"}, {"question": "问四"}, {"query": "问五"}, {"input": "问六"},
        {"other": "skipped"},
    ]))
    assert load_user_prompts(jsonl, 10) == ["问一", "问二", "问三", "问四", "问五", "问六"]
    assert load_user_prompts(jsonl, 2) == ["问一", "问二"]
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps([{"question": "a"}, {"question": "b"}]))
    assert load_user_prompts(as_list, 10) == ["a", "b"]
    as_dict = tmp_path / "e.json"
    as_dict.write_text(json.dumps({"data": [{"query": "c"}]}))
    assert load_user_prompts(as_dict, 10) == ["c"]


def test_missing_or_broken_warmup_file_is_no_data(tmp_path, caplog):
    broken = tmp_path / "bad.jsonl"
    broken.write_text('{"question": "ok"}\n{not json')
    with caplog.at_level("INFO"):
        assert load_user_prompts(broken, 10) == []
        assert load_user_prompts(tmp_path / "missing.jsonl", 10) == []
    assert "unreadable" in caplog.text and "no warm-up data" in caplog.text
    s = cfg.load_warmup({"WARMUP_DATA_PATH": str(broken), "WARMUP_REPEAT": "2", "WARMUP_PROMPT": "hi"})
    assert warmup_prompts(s) == ["hi", "hi"]


def test_sampling_defaults_and_stops():
    """The replaced service's defaults, carried over unchanged: greedy (TEMPERATURE 0), light
    repetition and frequency penalties against small-model loops, and Qwen's end markers."""
    s = cfg.load_sampling({})
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.frequency_penalty) == (0.0, 1.0, 1, 1.05, 0.1)
    assert s.stop_strings == ("<|im_end|>", "<|endoftext|>")
    assert cfg.load_sampling({"STOP_STRINGS": "END, ###"}).stop_strings == ("END", "###")
    assert cfg.load_sampling({"STOP_ON_DOUBLE_NEWLINE": "1"}).stop_strings[-1] == "\n\n"


def test_stop_token_ids_are_eos_plus_end_markers(tokenizer):
    ids = stop_token_ids(tokenizer, ("<|im_end|>", "<|endoftext|>"))
    assert ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")] or \
        set(ids) == {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}


@pytest.mark.parametrize("overrides, field", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": float("inf")}, "top_p"),
])
def test_invalid_sampling_is_refused(overrides, field):
    with pytest.raises(InvalidRequest, match=field):
        resolve(cfg.load_sampling({}), 8, overrides)


def test_equal_settings_are_equal_keys():
    a = resolve(cfg.load_sampling({}), 8, {"temperature": 0.5})
    b = resolve(cfg.load_sampling({}), 8, {"temperature": 0.5})
    assert a == b and hash(a) == hash(b)


def test_system_prompt_limit_and_strip():
    """The replaced service refused system prompts over 20,000 characters: at the limit is
    kept whole, one over is refused, never cut."""
    limit = cfg.SYSTEM_PROMPT_MAX_CHARS
    assert cfg.validate_system_prompt("  x  ") == "x"
    assert len(cfg.validate_system_prompt("字" * limit)) == limit
    assert len(cfg.validate_system_prompt(" " + "字" * limit + " ")) == limit  # counted after the strip
    with pytest.raises(ValueError, match=str(limit)):
        cfg.validate_system_prompt("字" * (limit + 1))
    with pytest.raises(SettingsError, match="SYSTEM_PROMPT"):
        cfg.load_chat({"SYSTEM_PROMPT": "x" * (limit + 1)})
    assert cfg.load_chat({"SYSTEM_PROMPT": " 简短 "}).system_prompt == "简短"
    assert "不要" in cfg.DEFAULT_SYSTEM_PROMPT and "代码" in cfg.DEFAULT_SYSTEM_PROMPT


def test_model_dir_resolution(tmp_path):
    assert cfg.resolve_model_dir({}, tmp_path) == tmp_path / "model" / cfg.EMBEDDED_MODEL_ID
    assert cfg.resolve_model_dir({"MODEL_ID": "Qwen/Qwen3-4B"}, tmp_path) == tmp_path / "model" / "Qwen" / "Qwen3-4B"
    (tmp_path / "merged").mkdir()
    assert cfg.resolve_model_dir({}, tmp_path) == tmp_path / "merged"
    assert cfg.resolve_model_dir({"MODEL_DIR": "/abs/m"}, tmp_path) == tmp_path / "/abs/m"


def test_blank_device_variables_removed_and_plugins_policy():
    env = {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": " ", "VLLM_DEVICE": "", "KEEP": ""}
    prepare_process_environment(env, metax=False)
    assert env == {"KEEP": "", "VLLM_PLUGINS": "", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    env = {"VLLM_PLUGINS": "mine"}
    prepare_process_environment(env, metax=False)
    assert env["VLLM_PLUGINS"] == "mine"
    env = {"VLLM_WORKER_MULTIPROC_METHOD": "fork"}
    prepare_process_environment(env, metax=True)
    assert env == {"VLLM_USE_V1": "1", "VLLM_WORKER_MULTIPROC_METHOD": "fork"}
    env = {"VLLM_USE_V1": "0"}
    prepare_process_environment(env, metax=True)
    assert env["VLLM_USE_V1"] == "0"


def test_the_generators_penalties_plugin_is_named_where_on_unless_plugins_are_the_users():
    def plugins(env: dict, metax: bool = False, cpu_only: bool = True):
        prepare_process_environment(env, metax=metax)
        choose_vllm_plugins(env, load_engine(env, metax=metax, cpu_only=cpu_only))
        return env.get("VLLM_PLUGINS")

    assert plugins({}) == PLUGIN_NAME  # on by default without a GPU
    assert plugins({}, cpu_only=False) == ""  # off by default on one
    assert plugins({"VLLM_FAST_PENALTIES": "1"}, cpu_only=False) == PLUGIN_NAME
    assert plugins({"VLLM_FAST_PENALTIES": "0"}) == ""
    assert plugins({"VLLM_PLUGINS": "mine"}) == "mine"
    assert plugins({"VLLM_FAST_PENALTIES": "1"}, metax=True) is None  # MetaX needs its platform plugin


def test_public_environment_never_shows_secrets():
    env = {"MAX_NEW_TOKENS": "32", "HF_TOKEN": "hf_secret", "OPENAI_API_KEY": "sk-x", "MY_SECRET": "s",
           "SHIM_ADMIN_TOKEN": "t", "DB_PASSWORD": "p"}
    shown = cfg.public_environment(env)
    assert shown == {"MAX_NEW_TOKENS": "32"}


@pytest.mark.parametrize("name, secret", [
    ("HF_TOKEN", True), ("openai_api_key", True), ("DB_PASSWORD", True), ("AWS_CREDENTIALS", True),
    ("MAX_NEW_TOKENS", False), ("SHIM_MAX_REQUEST_TOKENS", False), ("KEYWORDS", False), ("TOKENIZER", False),
])
def test_looks_secret_matches_words_not_substrings(name, secret):
    assert cfg.looks_secret(name) is secret


def test_a_listed_variable_that_looks_secret_is_still_hidden(monkeypatch):
    """The allow-list and the name check both apply: listing HF_TOKEN by mistake shows nothing."""
    monkeypatch.setattr(cfg, "PUBLIC_VARIABLES", (*cfg.PUBLIC_VARIABLES, "HF_TOKEN"))
    assert cfg.public_environment({"HF_TOKEN": "hf_x", "MAX_NEW_TOKENS": "32"}) == {"MAX_NEW_TOKENS": "32"}


def test_only_stop_strings_that_can_reach_the_text_are_searched(tokenizer):
    """"<|im_end|>" is a special token with a stop id: vLLM never decodes it into the text,
    so only the id is checked. A plain string, or a special token without a stop id, stays."""
    from preprocess.engine.service import text_stop_strings

    ids = stop_token_ids(tokenizer, ["<|im_end|>"])
    assert text_stop_strings(tokenizer, ["<|im_end|>", "\n\n", "Human:"], ids) == ["\n\n", "Human:"]
    assert text_stop_strings(tokenizer, ["<|im_end|>"], []) == ["<|im_end|>"]
    assert text_stop_strings(None, ["<|im_end|>"], ids) == ["<|im_end|>"]


@pytest.mark.parametrize("raw, endpoint", [
    (None, "127.0.0.1:8010"), ("", "127.0.0.1:8010"), ("http://triton:8000", "triton:8000"),
    ("http://10.0.0.5:8000/", "10.0.0.5:8000"), ("triton.llm.svc:8000", "triton.llm.svc:8000"),
])
def test_triton_url_names_the_server_to_attach_to(raw, endpoint):
    from preprocess.settings import load_shim

    shim = load_shim({} if raw is None else {"TRITON_URL": raw})
    assert shim.triton_endpoint == endpoint and (shim.triton_url is None) == (not raw)


@pytest.mark.parametrize("raw", ["https://triton:8000", "triton", "http://triton:port", "http://t:8000/v2", ":8000"])
def test_a_triton_url_that_is_not_host_port_stops_with_one_line(raw):
    from preprocess.settings import load_shim

    with pytest.raises(SettingsError, match=r"^TRITON_URL=") as refused:
        load_shim({"TRITON_URL": raw})
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("environ, endpoint", [
    ({}, "127.0.0.1:8011"), ({"TRITON_GRPC_PORT": "9001"}, "127.0.0.1:9001"),
    ({"TRITON_URL": "http://triton:8000"}, "triton:8001"),  # an attached Triton: its default gRPC port
    ({"TRITON_URL": "http://triton:8000", "TRITON_GRPC_URL": "grpc://triton:9001"}, "triton:9001"),
    ({"TRITON_GRPC_URL": "g:7"}, "g:7"),
])
def test_the_grpc_endpoint_for_streams(environ, endpoint):
    from preprocess.settings import load_shim

    assert load_shim(environ).triton_grpc_endpoint == endpoint


@pytest.mark.parametrize("raw", ["http://triton:8001", "triton", "grpc://triton:x"])
def test_a_grpc_url_that_is_not_host_port_stops_with_one_line(raw):
    from preprocess.settings import load_shim

    with pytest.raises(SettingsError, match=r"^TRITON_GRPC_URL=") as refused:
        load_shim({"TRITON_GRPC_URL": raw})
    assert "\n" not in str(refused.value)


def test_print_env_exports_what_the_stubs_need(tmp_path):
    """`./build.sh env`: the venv's python first on PATH, tritonserver on PATH, the model."""
    import shlex
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "shim.serve", "--print-env"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "MODEL_DIR": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines())
    exports = {name: shlex.split(value)[0] for name, value in exports.items()}
    path = exports["PATH"].split(":")
    assert path[0] == f"{exports['TRITON_HOME']}/bin" and path[1] == str(Path(sys.executable).parent)
    assert exports["MODEL_DIR"] == str(tmp_path) and "LLM_RUNTIME_DIR" not in exports
    assert (Path(exports["TRITON_HOME"]) / "bin" / "tritonserver").is_file()
