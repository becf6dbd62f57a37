"""The web page (/ui) driven as a person would: headless Debian Chromium through Playwright.

Screenshots land in tests/.artifacts/ui-*.png.
"""
from __future__ import annotations

import json
import shutil

import pytest

from .conftest import ARTIFACTS, TINY_ANSWER, engine_in_slices, error_text

pytestmark = pytest.mark.server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "What is a CUDA kernel?"


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server.url + "/ui")
        page.wait_for_function("['ok', 'batch'].includes(document.getElementById('status').textContent)")
        page.wait_for_selector("#system-status:has-text('loaded')")  # the page's own first load is done
        yield page
        browser.close()


def test_chat_answer_streams_and_uses_the_controls(page, server):
    page.fill("#max_new_tokens", "32")
    page.fill("#temperature", "0")
    page.fill("#top_k", "1")
    page.fill("#chat-input", QUESTION)
    # Every text the answer shows, in order, recorded by the page itself as it changes.
    page.evaluate("""() => {
        window.shownAnswers = [];
        new MutationObserver((records) => {
            for (const record of records)
                for (const node of record.addedNodes)
                    if (node.nodeType === Node.TEXT_NODE && record.target.classList.contains("a"))
                        window.shownAnswers.push(node.data);
        }).observe(document.getElementById("chat-log"), {childList: true, subtree: true});
    }""")
    # The engine runs in slices, so the answer comes in several pieces on any machine: a
    # loaded one would otherwise make all 32 tokens before the page shows the first.
    with engine_in_slices(server):
        with page.expect_request("**/v1/chat/completions") as sent:
            page.click("#chat-send")
        assert json.loads(sent.value.post_data) == {
            "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0, "top_k": 1,
            "stream": True}
        page.wait_for_selector("#chat-log .turn.done", timeout=120_000)
    shown = page.get_attribute("#chat-log .turn.done .a", "data-answer")
    page.screenshot(path=str(ARTIFACTS / "ui-chat.png"), full_page=True)
    # Greedy decoding: the page's answer is the one the API gives whole for the same settings.
    status, direct = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 32, "temperature": 0, "top_k": 1,
        "raw": True})
    assert status == 200 and shown == direct["choices"][0]["message"]["content"] == TINY_ANSWER * 32
    # It grew on the page: partial answers, each extending the one before, then the whole.
    growth = [text for text in page.evaluate("window.shownAnswers") if text not in ("…",)]
    assert len(set(growth)) >= 3 and growth[-1] == shown, growth
    assert all(later.startswith(earlier) for earlier, later in zip(growth, growth[1:])), growth


def test_system_prompt_applied_and_seen_in_the_explainer(page, server):
    original = server.get("/system_prompt")[1]["system_prompt"]
    marker = "You answer as the UI test 7f3a."
    try:
        page.fill("#system-prompt", "")
        with page.expect_response("**/system_prompt"):
            page.click("#system-load")
        page.wait_for_function(f"document.getElementById('system-prompt').value === {json.dumps(original)}")
        page.fill("#system-prompt", marker)
        page.click("#system-apply")
        page.wait_for_selector("#system-status:has-text('applied')")
        assert server.get("/system_prompt")[1]["system_prompt"] == marker
        page.fill("#explain-input", "写一个 CUDA 向量加法的代码")
        page.click("#explain-run")
        page.wait_for_selector("#explain-result .final-prompt")
        final_prompt = page.text_content("#explain-result .final-prompt")
        route_line = page.text_content("#explain-result .route")
        page.screenshot(path=str(ARTIFACTS / "ui-system-prompt.png"), full_page=True)
        assert marker in final_prompt and "向量加法" in final_prompt
        assert "route: code" in route_line
    finally:
        server.post("/system_prompt", {"system_prompt": original})


def test_batch_of_five_with_progress(page):
    questions = ["What is CUDA?", "什么是共享内存？", "Explain warps.", "What is NVLink?", "What is a stream?"]
    page.fill("#batch-input", "\n".join(questions))
    page.fill("#batch-chunk", "2")  # three requests, so progress moves
    page.click("#batch-run")
    page.wait_for_selector("#batch-count.finished", timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "ui-batch.png"), full_page=True)
    rows = page.query_selector_all("#batch-results tbody tr.answered")
    assert [r.query_selector_all("td")[1].text_content() for r in rows] == questions
    assert page.eval_on_selector("#batch-progress", "p => p.value") == 5
    assert page.text_content("#batch-count").startswith("5/5")


def test_jsonl_file_fills_the_batch(page):
    lines = [json.dumps({"question": f"question {i}", "answer": "x"}, ensure_ascii=False) for i in range(3)]
    page.set_input_files("#batch-file", files=[{
        "name": "q.jsonl", "mimeType": "application/json", "buffer": "\n".join(lines).encode()}])
    page.wait_for_function("document.getElementById('batch-input').value.split('\\n').length === 3")
    assert page.input_value("#batch-input") == "question 0\nquestion 1\nquestion 2"


def test_info_panel_shows_the_backend(page):
    page.click("#info-refresh")
    page.wait_for_function("document.getElementById('info-body').textContent.includes('backend')")
    info = json.loads(page.text_content("#info-body"))
    assert info["backend"] == "vllm"
    assert "vllm" in page.text_content("#backend")


def test_explain_names_bad_input(server):
    status, body = server.post("/explain", {"prompt": ["a list"]})
    assert status == 422 and "prompt" in error_text(body)
    status, body = server.post("/explain", b'{"prompt": "\\ud800"}')
    assert status == 400 and "surrogate" in error_text(body)
    status, body = server.post("/explain", {"prompt": "什么是 GEMM 算子？", "max_new_tokens": 5})
    assert status == 200 and body["route"] == "long_answer" and body["max_new_tokens"] == 5
