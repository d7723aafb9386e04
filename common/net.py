"""Loopback ports for local meshes and tests."""

from __future__ import annotations

import pathlib
import random
import socket

_taken: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: port 0 would hand out ports from that range, where
    an outgoing connection can take the port between our check and the server's bind."""
    low, _ = (int(v) for v in pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    low = low if low > 12000 else 61000  # a machine with a low ephemeral range: use the ports above it
    for _ in range(1000):
        port = random.randrange(10000, low) if low < 61000 else random.randrange(61000, 65000)
        if port in _taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found")
