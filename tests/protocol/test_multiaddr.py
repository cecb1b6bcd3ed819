import ipaddress

import pytest

from crowdtrain.protocol.errors import AddressError, CrowdtrainError
from crowdtrain.protocol.multiaddr import tcp_multiaddr

# The parser hivemind itself runs on these strings (DHT(host_maddrs=..., announce_maddrs=...)).
# protocol may not import hivemind; its test may.
Multiaddr = pytest.importorskip("hivemind.utils.multiaddr").Multiaddr


def hivemind_reads(written: str) -> str:
    """What hivemind makes of ``written``: it parses it, and checks DNS labels as it writes
    it back (P2P.create does both: Multiaddr(addr), then str(addr) for p2pd)."""
    return str(Multiaddr(written))


def test_ip_literals_and_names():
    assert tcp_multiaddr("127.0.0.1", 8472) == "/ip4/127.0.0.1/tcp/8472"
    assert tcp_multiaddr("::1", 8472) == "/ip6/::1/tcp/8472"
    # A public host name (README: --public-host coordinator.example.org) is resolved by libp2p;
    # written as /ip4/ it killed the DHT process.
    assert tcp_multiaddr("coordinator.example.org", 8472) == "/dns/coordinator.example.org/tcp/8472"


@pytest.mark.parametrize("bad", ["", "a/b", "two words"])
def test_bad_hosts_are_refused(bad):
    with pytest.raises(ValueError, match="not a host name"):
        tcp_multiaddr(bad, 1)


@pytest.mark.parametrize(
    ("host", "written"),
    [
        ("127.0.0.1", "/ip4/127.0.0.1/tcp/8472"),
        ("0.0.0.0", "/ip4/0.0.0.0/tcp/8472"),
        ("::1", "/ip6/::1/tcp/8472"),
        ("[::1]", "/ip6/::1/tcp/8472"),
        ("0:0:0:0:0:0:0:1", "/ip6/::1/tcp/8472"),
        ("2001:db8::7", "/ip6/2001:db8::7/tcp/8472"),
        ("[2001:db8::7]", "/ip6/2001:db8::7/tcp/8472"),
        ("fe80::1%eth0", "/ip6zone/eth0/ip6/fe80::1/tcp/8472"),
        ("[fe80::1%eth0]", "/ip6zone/eth0/ip6/fe80::1/tcp/8472"),
        ("fe80::1%3", "/ip6zone/3/ip6/fe80::1/tcp/8472"),
        ("localhost", "/dns/localhost/tcp/8472"),
        ("coordinator.example.org", "/dns/coordinator.example.org/tcp/8472"),
        ("coordinator.example.org.", "/dns/coordinator.example.org/tcp/8472"),
        ("node-7.Lab.example", "/dns/node-7.Lab.example/tcp/8472"),
        ("a" * 63 + ".example", f"/dns/{'a' * 63}.example/tcp/8472"),
    ],
)
def test_what_we_write_hiveminds_parser_reads_back(host, written):
    assert tcp_multiaddr(host, 8472) == written
    assert hivemind_reads(written) == written.lower()  # it lower-cases DNS names


def test_an_ipv4_mapped_ipv6_address_keeps_its_value():
    written = tcp_multiaddr("::ffff:192.0.2.1", 8472)  # Python may print it ::ffff:c000:201
    parsed = Multiaddr(hivemind_reads(written))
    assert ipaddress.ip_address(parsed.value_for_protocol("ip6")) == ipaddress.ip_address(
        "::ffff:192.0.2.1"
    )
    assert parsed.value_for_protocol("tcp") == "8472"


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("a_b.local", "letters, digits or inner hyphens"),
        ("-bad.example", "letters, digits or inner hyphens"),
        ("bad-.example", "letters, digits or inner hyphens"),
        ("a..b", "letters, digits or inner hyphens"),
        ("ab--c.example", "'--' in the third and"),
        ("xn--bcher-kva.de", "'--' in the third and"),
        ("bücher.de", "not an ASCII DNS name"),
        ("a" * 64 + ".example", "1 to 63"),
        (".".join(["a" * 60] * 5), "longer than a DNS name"),
        ("1.2.3", "not an IP address"),
        ("256.1.1.1", "not an IP address"),
        ("[example.org]", "only an IPv6 address goes in brackets"),
        ("[1.2.3.4]", "only an IPv6 address goes in brackets"),
        ("1.2.3.4%eth0", "letters, digits or inner hyphens"),
    ],
)
def test_hosts_libp2p_cannot_take_are_refused_with_the_fix(host, why):
    with pytest.raises(AddressError, match=why) as refused:
        tcp_multiaddr(host, 8472)
    assert repr(host) in str(refused.value)
    assert isinstance(refused.value, CrowdtrainError)  # one line on stderr from either CLI


@pytest.mark.parametrize(
    "host",
    ["a_b.local", "-bad.example", "a..b", "ab--c.example", "xn--bcher-kva.de"],
)
def test_the_refused_names_are_those_hivemind_refuses(host):
    # What the writer used to produce for them: hivemind's parser fails on each.
    with pytest.raises(ValueError):
        hivemind_reads(f"/dns/{host}/tcp/8472")


@pytest.mark.parametrize("host", ["[::1]", "fe80::1%eth0"])
def test_the_ip6_forms_hivemind_refuses(host):
    # What the writer used to produce for these: /ip6/ with brackets or a zone.
    with pytest.raises(ValueError):
        hivemind_reads(f"/ip6/{host}/tcp/8472")


@pytest.mark.parametrize("port", [-1, 65536, 8472.0, True])
def test_ports_outside_tcp_are_refused(port):
    with pytest.raises(AddressError, match="not a TCP port"):
        tcp_multiaddr("127.0.0.1", port)
