"""The command-line tools and presets users run: preprocess explain/clean, the three presets."""
import json
import subprocess
import sys

from tests.conftest import REPO


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "preprocess", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=120)


def test_explain_prints_route_limit_and_exact_prompt(tiny_model):
    out = run("explain", "用 CUDA 写一个 GEMM 算子", "--model-dir", str(tiny_model), "--system-prompt", "简短")
    result = json.loads(out.stdout)
    assert result["route"] == "long_answer" and result["max_new_tokens"] == 192
    assert result["prompt"] == ("<|im_start|>system\n简短<|im_end|>\n<|im_start|>user\n用 CUDA 写一个 GEMM 算子"
                                "<|im_end|>\n<|im_start|>assistant\n")


def test_clean_prints_the_cleaned_answer():
    out = run("clean", "<think>嗯</think>要点一。例如：x", "--question", "什么是 warp")
    assert json.loads(out.stdout) == {"route": "short", "answer": "要点一"}


def test_explain_refuses_a_malformed_variable_in_one_line():
    out = run("clean", "x", env={"PATH": "/usr/bin:/bin", "OUTPUT_MAX_SENTENCES": "many"})
    assert out.returncode == 2 and out.stderr.strip() == "error: OUTPUT_MAX_SENTENCES='many' is not an integer"


def preset_env(preset: str, **given) -> dict:
    script = f"set -e; source docker/{preset}; env -0"
    out = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, env={"PATH": "/usr/bin:/bin", **given})
    # A preset that fails to source must fail here, not yield an empty mapping that loads.
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return dict(item.split("=", 1) for item in out.stdout.decode().split("\0") if "=" in item)


def test_run_model_preset_fills_only_unset_variables():
    env = preset_env("run_model.sh", MAX_NEW_TOKENS="48")
    assert env["MAX_NEW_TOKENS"] == "48" and env["BATCH_MODE"] == "1" and env["TEMPERATURE"] == "0"


def test_env_force_preset_overrides():
    env = preset_env("env_force.sh", MAX_NEW_TOKENS="48", BATCH_MODE="0")
    assert env["MAX_NEW_TOKENS"] == "32" and env["BATCH_MODE"] == "1" and env["FAST_CHAT_TEMPLATE"] == "1"


def test_presets_parse_as_valid_settings():
    from preprocess.settings import load

    for preset in ("run_model.sh", "env_force.sh"):
        env = preset_env(preset)
        settings = load(env)
        assert env["BATCH_MODE"] == "1" and settings.routing.max_new_tokens == int(env["MAX_NEW_TOKENS"])


def test_online_preset_fills_only_unset_engine_defaults():
    from preprocess.engine_settings import load_engine

    env = preset_env("online.sh")
    engine = load_engine(env, metax=False)
    assert engine.compilation_config == {} and engine.scheduler_defaults == "serve"
    assert "BATCH_MODE" not in env  # online: health says ok, engine statistics stay on
    assert engine.engine_stats
    mine = preset_env("online.sh", VLLM_COMPILATION_CONFIG='{"backend": "eager"}', VLLM_SCHEDULER_DEFAULTS="offline")
    engine = load_engine(mine, metax=False)
    assert engine.compilation_config == {"backend": "eager"} and engine.scheduler_defaults == "offline"
