"""HTTP facts shared by every Ballast server: hop-by-hop headers, loopback clients, free ports.

One copy of each, so the replica runtime (which proxies to external engines), the gateway (which
proxies to replicas), the backends and the tests agree.
"""

from __future__ import annotations

import ipaddress
import socket

# Headers that describe one connection (RFC 9110 section 7.6.1) or that the proxy sets itself, so they
# are never copied from an upstream response: framing and encoding are redone by our server, and
# `x-request-id` is the proxy's own.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "content-length", "content-encoding", "server", "date", "x-request-id",
})


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it; a race with another binder is possible)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine (127.0.0.0/8, ::1, or an IPv4-mapped loopback)."""
    if not host:
        return False
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
