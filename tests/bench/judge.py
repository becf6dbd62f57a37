"""`./build.sh eval FILE`: the judge's procedure, as a client, against a running server.

1. poll GET / for up to 180 s; 2. if it says "batch", send every question in one
POST /predict, else one request per question, all within 360 s; 3. score Rouge-L F1
after jieba segmentation, and speed as answer characters per second of request time.

The trap, reported in the output: rouge-score's default tokenizer keeps only [a-z0-9]
tokens, so a pure-Chinese answer scores 0 however good it is. The judge's configuration
(default tokenizer) is scored as `rougeL_judge`; `rougeL_cjk` uses a whitespace tokenizer
on the jieba words, to show what the Chinese content itself earns.

    ./build.sh eval tests/data/judge_questions.jsonl [--url http://127.0.0.1:8000] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import http_json  # noqa: E402
from shim.progress import Heartbeat  # noqa: E402

log = logging.getLogger("eval")
HEALTH_BUDGET_S = 180
PREDICT_BUDGET_S = 360


class WhitespaceTokenizer:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


def segment(text: str) -> str:
    import jieba

    return " ".join(w for w in jieba.lcut(text) if w.strip())


def scorers():
    from rouge_score import rouge_scorer

    return (rouge_scorer.RougeScorer(["rougeL"]),  # what the judge configures
            rouge_scorer.RougeScorer(["rougeL"], tokenizer=WhitespaceTokenizer()))


def load(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            rows.append({"question": record.get("question") or record.get("prompt"),
                         "reference": record.get("answer") or record.get("reference") or ""})
    return rows


def wait_healthy(url: str) -> str:
    deadline = time.monotonic() + HEALTH_BUDGET_S
    while time.monotonic() < deadline:
        try:
            status, body = http_json("GET", url + "/", timeout=5)
            if status == 200 and body.get("status") in ("ok", "batch"):
                return body["status"]
            log.info("health: %s", body)
        except OSError as exc:
            log.info("health: %s", exc)
        time.sleep(2)
    raise SystemExit(f"eval: {url}/ not healthy within {HEALTH_BUDGET_S} s")


def predict(url: str, mode: str, questions: list[str]) -> tuple[list[str], list[float]]:
    deadline = time.monotonic() + PREDICT_BUDGET_S
    if mode == "batch":
        started = time.monotonic()
        with Heartbeat(log, f"batch request with {len(questions)} questions"):
            status, body = http_json("POST", url + "/predict", {"prompt": questions}, timeout=PREDICT_BUDGET_S)
        if status != 200 or len(body.get("response", [])) != len(questions):
            raise SystemExit(f"eval: batch request failed: {status} {str(body)[:300]}")
        seconds = time.monotonic() - started
        return body["response"], [seconds / len(questions)] * len(questions)
    answers, times = [], []
    for i, question in enumerate(questions, 1):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            log.warning("360 s budget spent after %d of %d questions", i - 1, len(questions))
            answers += [""] * (len(questions) - len(answers))
            times += [0.0] * (len(questions) - len(times))
            break
        started = time.monotonic()
        status, body = http_json("POST", url + "/predict", {"prompt": question}, timeout=remaining)
        times.append(time.monotonic() - started)
        answers.append(body.get("response", "") if status == 200 else "")
        if i % 5 == 0 or i == len(questions):
            log.info("[%d/%d] answered", i, len(questions))
    return answers, times


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[eval] %(message)s")
    parser = argparse.ArgumentParser(prog="./build.sh eval")
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / ".artifacts" / "eval")
    args = parser.parse_args(argv)
    import jieba

    jieba.setLogLevel(logging.WARNING)
    rows = load(args.file)
    mode = wait_healthy(args.url)
    log.info("server says %s: %s mode, %d questions", mode, "batch" if mode == "batch" else "sequential", len(rows))
    answers, times = predict(args.url, mode, [r["question"] for r in rows])
    judge, cjk = scorers()
    details = []
    for row, answer, seconds in zip(rows, answers, times):
        ref, hyp = segment(row["reference"]), segment(answer)
        judge_f = judge.score(ref, hyp)["rougeL"].fmeasure
        cjk_f = cjk.score(ref, hyp)["rougeL"].fmeasure
        details.append({**row, "answer": answer, "seconds": seconds, "rougeL_judge": judge_f, "rougeL_cjk": cjk_f,
                        "chars_per_s": len(answer) / seconds if seconds else 0.0,
                        "zero_from_tokenizer": judge_f == 0 and cjk_f > 0})
    count = len(details) or 1
    total_time = sum(times)
    summary = {
        "mode": mode, "questions": len(details),
        "rougeL_judge": sum(d["rougeL_judge"] for d in details) / count,
        "rougeL_cjk": sum(d["rougeL_cjk"] for d in details) / count,
        "answer_chars_per_s": sum(len(a) for a in answers) / total_time if total_time else 0.0,
        "request_seconds": total_time,
        "zeroed_by_default_tokenizer": sum(d["zero_from_tokenizer"] for d in details),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "details.jsonl").write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in details) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"TRAP: rouge-score's default tokenizer keeps only [a-z0-9] tokens. {summary['zeroed_by_default_tokenizer']} "
          f"of {len(details)} answers score 0 under the judge's configuration although their Chinese words "
          f"overlap the reference (rougeL_cjk {summary['rougeL_cjk']:.3f} against rougeL_judge "
          f"{summary['rougeL_judge']:.3f}): only Latin letters and digits (CUDA, GPU, 32...) count.")
    print(f"details: {args.out / 'details.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
