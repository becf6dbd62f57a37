"""The CI form of the soak: a bounded burst of mixed load on the shared server."""
import pytest

from .soak import run_soak

pytestmark = pytest.mark.server


def test_short_mixed_load_loses_nothing(server):
    original = server.get("/system_prompt")[1]["system_prompt"]
    try:
        report = run_soak(server, seconds=30, clients=8, window_s=10)
    finally:
        server.post("/system_prompt", {"system_prompt": original})
    print(f"\nshort soak: {report['requests']} requests {report['by_kind']}, {report['errors']} errors, "
          f"{report['crossed_answers']} crossed, max RSS growth {report['rss_growth_max']:.1%}")
    assert report["requests"] > 20
    assert report["errors"] == 0, report["error_samples"]
    assert report["crossed_answers"] == 0
