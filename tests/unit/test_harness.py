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
