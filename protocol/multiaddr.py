"""How a host and TCP port are written as a libp2p multiaddr (hivemind's address format).

An IP literal becomes ``/ip4/...`` or ``/ip6/...``; anything else is a DNS
name, written ``/dns/...`` for libp2p to resolve. Knows nothing about hivemind.
"""

from __future__ import annotations

import ipaddress


def tcp_multiaddr(host: str, port: int) -> str:
    """``/ip4/1.2.3.4/tcp/8472``, ``/ip6/::1/tcp/8472`` or ``/dns/example.org/tcp/8472``."""
    if not host or any(c in host for c in "/ \t\n"):
        raise ValueError(f"{host!r} is not a host name or an IP address")
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return f"/dns/{host}/tcp/{port}"
    return f"/ip{version}/{host}/tcp/{port}"
