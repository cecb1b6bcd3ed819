"""How a host and TCP port are written as a libp2p multiaddr (hivemind's address format).

An IP literal becomes ``/ip4/...`` or ``/ip6/...`` (brackets dropped; a
link-local address's zone becomes ``/ip6zone/<zone>/ip6/...``); anything
else is a DNS name, written ``/dns/...`` for libp2p to resolve. The output is
what hivemind's own multiaddr parser (hivemind.utils.multiaddr) accepts; a
host it would refuse, inside the DHT process where the error is hard to
read, is refused here with the fix. Knows nothing about hivemind.
"""

from __future__ import annotations

import ipaddress
import re

from crowdtrain.protocol.errors import AddressError

# A DNS label hivemind's parser takes: letters, digits and inner hyphens, at most 63
# characters (RFC 1123). It also refuses "--" in the third and fourth places, which
# IDNA reserves (so Punycode names, xn--..., are refused too).
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_NAME = 253


def tcp_multiaddr(host: str, port: int) -> str:
    """``/ip4/1.2.3.4/tcp/8472``, ``/ip6/::1/tcp/8472`` (also for ``[::1]``),
    ``/ip6zone/eth0/ip6/fe80::1/tcp/8472`` (for ``fe80::1%eth0``) or
    ``/dns/example.org/tcp/8472``.

    Raises :class:`AddressError` for a port outside 0..65535 and for a host that
    is neither an IP address nor a DNS name libp2p can take (``a_b.local``: pass
    the machine's IP address instead).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AddressError(f"port {port!r} is not a TCP port: give a number from 0 to 65535")
    if not host or any(c in host for c in "/ \t\r\n"):
        raise AddressError(f"{host!r} is not a host name or an IP address")
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(literal)
    except ValueError:
        if literal != host:
            raise AddressError(
                f"{host!r}: only an IPv6 address goes in brackets, e.g. [::1]"
            ) from None
        return f"/dns/{_dns_name(host)}/tcp/{port}"
    if isinstance(address, ipaddress.IPv4Address):
        if literal != host:
            raise AddressError(f"{host!r}: only an IPv6 address goes in brackets; write {literal}")
        return f"/ip4/{address}/tcp/{port}"
    zone = address.scope_id
    if zone is None:
        return f"/ip6/{address}/tcp/{port}"
    bare = ipaddress.IPv6Address(int(address))
    return f"/ip6zone/{zone}/ip6/{bare}/tcp/{port}"


def _dns_name(host: str) -> str:
    """``host`` as hivemind's parser takes a DNS name, or :class:`AddressError` saying why not."""
    name = host[:-1] if host.endswith(".") else host  # the root's dot: the same name
    if not name.isascii():
        # hivemind refuses the Punycode form (xn--...); the Unicode form reaches libp2p's
        # resolver, which does not translate it.
        raise AddressError(
            f"{host!r} is not an ASCII DNS name, which libp2p needs: pass the machine's IP "
            "address instead"
        )
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        raise AddressError(f"{host!r} is not an IP address (IPv4 is four numbers 0-255: 1.2.3.4)")
    for label in labels:
        if not _LABEL.fullmatch(label) or label[2:4] == "--":
            raise AddressError(
                f"{host!r} is not a DNS name libp2p can take: each dot-separated part must "
                "be 1 to 63 letters, digits or inner hyphens (no '_', no '--' in the third and "
                f"fourth places; {label!r} is not); pass the machine's IP address instead"
            )
    if len(name) > _MAX_NAME:
        raise AddressError(f"{host!r} is longer than a DNS name may be ({_MAX_NAME} characters)")
    return name
