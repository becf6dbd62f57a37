"""Heartbeat: long work logs a line every few seconds, and one at the end."""
from __future__ import annotations

import logging

import pytest

from shim.progress import Heartbeat
from tests.conftest import wait_for


def test_heartbeat_logs_while_running_and_at_the_end(caplog):
    caplog.set_level(logging.INFO)
    counter = {"n": 0}

    def beats_so_far() -> int:
        return sum("still running" in r.getMessage() for r in caplog.records)

    with Heartbeat(logging.getLogger("t"), "work", every_s=0.02, status=lambda: f"{counter['n']} done"):
        wait_for(lambda: beats_so_far() >= 2, 60)  # the work lasts until two beats
        counter["n"] = 5
    lines = [r.getMessage() for r in caplog.records]
    beats = [line for line in lines if "still running" in line]
    assert len(beats) >= 2 and beats[0].startswith("work: still running")
    assert lines[-1].startswith("work: done in") and lines[-1].endswith("5 done")


def test_heartbeat_says_failed_and_lets_the_error_through(caplog):
    caplog.set_level(logging.INFO)
    with pytest.raises(ValueError):
        with Heartbeat(logging.getLogger("t"), "work", every_s=10):
            raise ValueError("boom")
    assert caplog.records[-1].getMessage().startswith("work: failed after")
