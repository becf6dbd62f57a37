"""The test harness's own guarantees, which every server test relies on."""
import socket

from tests.conftest import ephemeral_ports_start, free_port


def test_free_ports_are_outside_the_kernels_range_distinct_and_bindable():
    """A server binds its ports a minute after they are chosen; a port the kernel could
    hand to someone else meanwhile (its ephemeral range) must never be chosen."""
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(1024 <= port < ephemeral_ports_start() for port in ports)
    with socket.socket() as s:
        s.bind(("", ports[-1]))


def test_a_soak_client_that_raises_counts_as_unfinished(monkeypatch):
    """A client thread that dies must not vanish from the soak's verdict."""
    from types import SimpleNamespace

    from tests.reliability import soak

    def refuses(*args, **kwargs):
        raise RuntimeError("injected: the client's own bug")

    monkeypatch.setattr(soak, "request_outcome", refuses)
    monkeypatch.setattr(soak, "http_json", lambda *a, **k: (200, {"usage": {"prompt_tokens": 1}}))
    monkeypatch.setattr(soak, "process_rss", lambda pid: {"shim": 100.0})
    server = SimpleNamespace(url="http://127.0.0.1:9", process=SimpleNamespace(pid=1))
    report = soak.run_soak(server, seconds=1, clients=2, max_requests=10, window_s=1)
    assert report["unfinished_clients"] == 2
    assert report["crashed_clients"] == [f"client {i}: RuntimeError: injected: the client's own bug" for i in (0, 1)]
