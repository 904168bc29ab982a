"""Ports for our servers come from outside the ephemeral range, each handed out once."""

import socket

from services.embedded import FREE_PORTS, free_port


def test_free_ports_are_distinct_bindable_and_outside_the_ephemeral_range():
    ports = [free_port() for _ in range(30)]
    assert len(set(ports)) == len(ports)
    assert all(FREE_PORTS[0] <= p <= FREE_PORTS[1] for p in ports)
    low, _ = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert FREE_PORTS[1] < low  # outgoing connections never take these source ports
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))
