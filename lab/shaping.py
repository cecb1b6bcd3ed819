"""Traffic shaping of one direction of a link with the kernel's ``tc``.

A direction is capped where its packets leave: an ``htb`` class at the rate on the
sending interface's egress, with a byte FIFO under it holding :data:`QUEUE_S` of traffic, or ``netem`` there when a propagation delay is asked and
the kernel has ``sch_netem`` (this machine does not: :func:`netem_available`).
Knows nothing about hosts or addresses.
"""

from __future__ import annotations

import re

from lab import netns

QUEUE_S = 0.2


def cap(namespace: str, device: str, rate_bps: float, delay_ms: float = 0.0) -> None:
    """Cap what leaves ``device`` in ``namespace`` at ``rate_bps`` bits per second;
    ``delay_ms`` adds a one-way delay when :func:`netem_available` says it can."""
    rate = f"{int(rate_bps)}bit"
    tc = ("tc", "-n", namespace)
    netns.run(*tc, "qdisc", "replace", "dev", device, "root", "handle", "1:", "htb", "default", "1")
    netns.run(
        *tc, "class", "add", "dev", device, "parent", "1:", "classid", "1:1", "htb",
        "rate", rate, "ceil", rate,
    )  # fmt: skip
    # A queue of QUEUE_S at the rate (at least two of the veth's 64 KiB GSO packets), as a
    # modest home router keeps; fq_codel and sfq are not in every kernel (not in this one).
    limit = f"{max(2 * 65536, int(rate_bps / 8 * QUEUE_S))}b"
    leaf: tuple[str, ...] = ("bfifo", "limit", limit)
    if delay_ms > 0:
        leaf = ("netem", "delay", f"{delay_ms}ms", "limit", "1000")
    netns.run(*tc, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *leaf)


def sent_bytes(namespace: str, device: str) -> int:
    """Bytes that left ``device`` in ``namespace`` through its cap since it was set."""
    out = netns.run("tc", "-n", namespace, "-s", "qdisc", "show", "dev", device).stdout
    # The root qdisc (htb, handle 1:) is listed first; its counter holds every byte sent.
    found = re.search(r"Sent (\d+) bytes", out)
    if found is None:
        raise netns.CommandFailed(f"no byte counter on {device} in {namespace}:\n{out}")
    return int(found.group(1))


def netem_available(namespace: str) -> bool:
    """Whether this kernel can delay packets (``sch_netem``): tried on ``namespace``'s
    loopback, and removed again."""
    tc = ("tc", "-n", namespace, "qdisc")
    result = netns.run(*tc, "add", "dev", "lo", "root", "netem", "delay", "1ms", check=False)
    if result.returncode != 0:
        return False
    netns.run(*tc, "del", "dev", "lo", "root", check=False)
    return True
