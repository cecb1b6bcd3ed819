import pytest

from crowdtrain.protocol.multiaddr import tcp_multiaddr


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
