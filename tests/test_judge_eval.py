"""The offline judge against the session's real server."""
from __future__ import annotations

import json

import pytest

from tests.bench import judge

from .conftest import REPO

pytestmark = pytest.mark.server


def test_eval_runs_the_judge_procedure_and_scores(server, tmp_path, capsys):
    data = tmp_path / "five.jsonl"
    lines = (REPO / "tests" / "data" / "judge_questions.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert judge.main([str(data), "--url", server.url, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "ok" and summary["questions"] == 5
    assert summary["answer_chars_per_s"] > 0
    details = [json.loads(l) for l in (tmp_path / "out" / "details.jsonl").read_text().splitlines()]
    assert len(details) == 5 and all("rougeL_judge" in d for d in details)
    assert "TRAP" in capsys.readouterr().out


def test_the_tokenizer_trap_is_real():
    judge_scorer, cjk_scorer = judge.scorers()
    reference, answer = judge.segment("共享内存位于片上"), judge.segment("共享内存位于片上")
    assert judge_scorer.score(reference, answer)["rougeL"].fmeasure == 0  # the judge's configuration
    assert cjk_scorer.score(reference, answer)["rougeL"].fmeasure == 1.0
    assert len(open(REPO / "tests" / "data" / "judge_questions.jsonl", encoding="utf-8").readlines()) >= 30
