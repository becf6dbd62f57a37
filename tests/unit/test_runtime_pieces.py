"""Cancel markers, the tritonserver supervisor's back-off, and the pipeline stages per row."""
import threading
import time

import pytest

from preprocess.postprocess_stage import PostprocessStage
from preprocess.preprocess_stage import PreprocessStage
from preprocess.runtime import CancelMarkers, Rarely
from preprocess.sampling import InvalidRequest
from preprocess.settings import load
from shim.serve import TritonSupervisor, restart_delay


def test_cancel_markers_mark_take_once_and_sweep(tmp_path):
    markers = CancelMarkers(tmp_path / "cancel")
    markers.mark("abc-123")
    assert markers.take("abc-123") is True
    assert markers.take("abc-123") is False  # taken once
    markers.mark("old")
    assert markers.sweep(now=time.time() + CancelMarkers.max_age_s - 1) == 0
    assert markers.sweep(now=time.time() + CancelMarkers.max_age_s + 1) == 1
    assert not list((tmp_path / "cancel").iterdir())


@pytest.mark.parametrize("request_id", ["../escape", "a/b", "", "x" * 129, "..", "a b", "id\\x00"])
def test_a_marker_name_never_leaves_its_folder(tmp_path, request_id):
    markers = CancelMarkers(tmp_path / "cancel")
    markers.mark(request_id)
    assert markers.take(request_id) is False
    assert not list(tmp_path.rglob("*escape*")) and not list((tmp_path / "cancel").iterdir())


def test_restart_delay_doubles_to_30_s():
    assert [restart_delay(1.0, n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(0.5, 1) == 0.5


def test_the_supervisor_restarts_a_server_that_keeps_exiting_and_stops(caplog):
    """A real process that exits at once: restarted with growing delays, then stopped."""
    supervisor = TritonSupervisor(["sh", "-c", "exit 3"], {"PATH": "/usr/bin:/bin"}, restart_delay_s=0.01)
    with caplog.at_level("ERROR"):
        supervisor.start()
        deadline = time.monotonic() + 60
        while supervisor.restarts < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        supervisor.stop(5)
    assert supervisor.restarts >= 3
    assert "tritonserver exited with 3; restarting in 0 s (restart 1)" in caplog.text
    count = supervisor.restarts
    time.sleep(0.2)
    assert supervisor.restarts == count and not any(t.name == "triton-supervisor" for t in threading.enumerate())


def test_preprocess_uses_each_rows_system_prompt_and_names_the_bad_row(tokenizer):
    stage = PreprocessStage(load({}), tokenizer)
    rows = stage.run(["q one", "q two"], system_prompts=["Be brief.", "用中文回答。"])
    assert "Be brief." in rows[0].text and "用中文回答。" not in rows[0].text
    assert "用中文回答。" in rows[1].text and "Be brief." not in rows[1].text
    default = stage.run(["q one"], system_prompts=[""])[0].text
    assert default == stage.run(["q one"])[0].text  # empty means the configured prompt
    with pytest.raises(InvalidRequest, match=r"^prompt 1: temperature must be in \[0, 2\], got 5"):
        stage.run(["fine", "bad"], overrides={"temperature": [0.5, 5.0]})


def test_postprocess_cleans_each_row_by_its_own_route():
    stage = PostprocessStage(load({"OUTPUT_MAX_SENTENCES": "1"}))
    text = "<think>plan</think>第一句。第二句。第三句。"
    (short, code, raw), thoughts = stage.run([text, text, text], ["short", "code", "raw"], [False, True, False])
    assert short == "第一句。"  # sentences are cut at Chinese punctuation and newlines
    assert code == "第一句。第二句。第三句。"  # thinking removed, every sentence kept
    assert raw == text  # the caller asked for the model's own text
    assert thoughts == ["", "", ""]  # no row asked for its thinking


def test_postprocess_splits_thinking_out_where_the_row_asks():
    """ReasoningMode per row: dropped (the judge's clean-up), split out by vLLM's parser
    (REASONING_PARSER), split out of an answer whose opening tag the template wrote, or not
    split because the request turned thinking off."""
    stage = PostprocessStage(load({"OUTPUT_MAX_SENTENCES": "1", "REASONING_PARSER": "qwen3"}))
    answers, thoughts = stage.run(["<think>plan</think>第一句。第二句。", "<think>plan</think>第一句。第二句。",
                                   "plan</think>答。", "<think>cut off mid-thought", "第一句。第二句。"],
                                  ["short", "short", "code", "code", "short"], [False] * 5, [0, 1, 2, 1, 3])
    assert answers == ["第一句。", "第一句。", "答。", "", "第一句。"]
    assert thoughts == ["", "plan", "plan", "cut off mid-thought", ""]
    assert stage.reasoning.name == "qwen3"
    # REASONING_PARSER=auto with SmolLM2's tokenizer (no thinking tags): nothing to split with,
    # so clean-up drops the thinking as on /predict.
    plain = PostprocessStage(load({"OUTPUT_MAX_SENTENCES": "1"}))
    answers, thoughts = plain.run(["<think>plan</think>第一句。"], ["short"], [False], [1])
    assert plain.reasoning is None and thoughts == [""] and "plan" not in answers[0]


def test_a_parser_vllm_lacks_is_logged_at_load_and_does_not_stop_the_model(caplog):
    stage = PostprocessStage(load({"REASONING_PARSER": "no-such-parser"}))
    stage.prepare_reasoning()
    assert "REASONING_PARSER='no-such-parser' is not a reasoning parser of the installed vLLM" in caplog.text


def test_a_costly_question_is_asked_at_most_once_per_interval_and_a_yes_sticks():
    now, asked, answers = [0.0], [], iter([False, False, True])

    def ask():
        asked.append(now[0])
        return next(answers)

    cancelled = Rarely(ask, every_s=0.1, clock=lambda: now[0])
    for t in (0.0, 0.05, 0.099, 0.1, 0.15, 0.2, 0.25, 0.3, 0.31, 5.0):
        now[0] = t
        cancelled()
    assert asked == [0.0, 0.1, 0.2]  # the first call asks; then once per 0.1 s until the yes
    assert cancelled() and len(asked) == 3
