"""The CI form of the soak: a bounded burst of mixed load on the shared server."""
import pytest

from .soak import run_soak

pytestmark = pytest.mark.server


def test_short_mixed_load_loses_nothing(server):
    original = server.get("/system_prompt")[1]["system_prompt"]
    try:
        # Bounded by count as well as time: on a slow machine fewer requests, never a wrong verdict.
        report = run_soak(server, seconds=30, clients=8, max_requests=400, window_s=10)
    finally:
        server.post("/system_prompt", {"system_prompt": original})
    print(f"\nshort soak: {report['requests']} requests {report['by_kind']}, {report['errors']} errors, "
          f"{report['crossed_answers']} crossed, max RSS growth {report['rss_growth_max']:.1%}")
    assert report["unfinished_clients"] == 0, report["crashed_clients"]
    assert report["requests_per_client_min"] >= 1  # every client got through at least one request
    assert report["errors"] == 0, report["error_samples"]
    assert report["crossed_answers"] == 0
