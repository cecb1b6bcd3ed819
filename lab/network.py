"""The lab's small internet: a router, hosts on capped links, home NAT routers, and the
processes that run on the hosts; all of it removed again at :meth:`Lab.shutdown`.

Every host is a network namespace joined to the router namespace by a veth pair;
its uplink is capped where packets leave it and its downlink where they leave the
router (:mod:`lab.shaping`). A host behind NAT sits behind a home router namespace of
its own (nftables masquerade, no inbound forwarding): it can open connections out and
nobody can open one in. Addresses are private and exist only inside the namespaces:
host ``i`` (from 1) has ``10.77.i.2`` on a /24 with the router at ``10.77.i.1``; behind
NAT, that address is its home router's and the host has ``10.200.i.2`` on the home's
LAN. The router routes to every home LAN, so an inbound connection reaches the home
router and its firewall refuses it, as a real one would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from lab import netns, shaping

logger = logging.getLogger(__name__)

ROUTER = "router"
WAN_NET = "10.77"
LAN_NET = "10.200"
MAX_HOSTS = 250

# A home router: masquerade what leaves through the WAN; forward what the LAN opens and
# the answers to it, nothing else (no port forwarding).
HOME_NAT_RULES = """
table ip lab_home {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
}
"""


@dataclass(frozen=True)
class Link:
    """A host's access link: each direction's cap in bits per second (None: uncapped)
    and a one-way delay, added only where the kernel has ``sch_netem``."""

    up_bps: float | None = None
    down_bps: float | None = None
    delay_ms: float = 0.0


@dataclass(frozen=True)
class HostSpec:
    """A host to build: its name (unique in the lab, letters, digits and dashes), its
    link, and whether it sits behind a home NAT router."""

    name: str
    link: Link = field(default_factory=Link)
    behind_nat: bool = False


@dataclass(frozen=True)
class Host:
    """A host as built: where it runs, the address it has, and the address the rest of
    the lab sees its connections come from (its home router's, behind NAT)."""

    spec: HostSpec
    namespace: str
    address: str
    public_address: str
    home_namespace: str | None
    # Where each direction's cap sits: (namespace, device) whose egress is capped.
    uplink: tuple[str, str]
    downlink: tuple[str, str]

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class Started:
    """A process the lab started on a host, with its log."""

    name: str
    host: str
    popen: subprocess.Popen
    log: Path


class Lab:
    """A small internet of ``specs`` hosts, planned at construction and built by
    :meth:`start`; :meth:`shutdown` stops every process started on it and deletes every
    namespace. Use it as a context manager: the lab is removed on an exception, Ctrl-C
    or (in the main thread) SIGTERM too. Needs root: :class:`lab.netns.LabUnavailable`
    otherwise. Processes' logs go to ``log_dir/<name>.log``."""

    def __init__(self, specs: list[HostSpec], log_dir: Path, prefix: str | None = None):
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names) or ROUTER in names:
            raise ValueError(f"host names must be unique and not {ROUTER!r}: {names}")
        if len(specs) > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts, not {len(specs)}")
        self.prefix = prefix or netns.new_prefix()
        self.log_dir = log_dir
        self.router = self.prefix + ROUTER
        self.hosts = {spec.name: self._plan(i, spec) for i, spec in enumerate(specs, start=1)}
        self.started: list[Started] = []
        self.netem = False
        self._namespaces: list[str] = []
        self._sigterm: Any = None  # SIGTERM's handler before start(), restored at shutdown

    def _plan(self, i: int, spec: HostSpec) -> Host:
        wan = f"{WAN_NET}.{i}.2"
        namespace = self.prefix + spec.name
        if not spec.behind_nat:
            return Host(spec, namespace, wan, wan, None, (namespace, "eth0"), self._down(i))
        home = f"{self.prefix}home{i}"
        lan = f"{LAN_NET}.{i}.2"
        return Host(spec, namespace, lan, wan, home, (home, "wan"), self._down(i))

    def _down(self, i: int) -> tuple[str, str]:
        return (self.router, f"h{i}")

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.shutdown()

    def start(self) -> None:
        """Build the router, every host, home router and cap."""
        netns.require()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        self._add(self.router)
        self._forward(self.router)
        self.netem = shaping.netem_available(self.router)
        for i, host in enumerate(self.hosts.values(), start=1):
            self._build(i, host)
        logger.info(
            "lab %s up: %s", self.prefix, ", ".join(_describe(h) for h in self.hosts.values())
        )
        if not self.netem and any(h.spec.link.delay_ms for h in self.hosts.values()):
            logger.warning("no propagation delay: this kernel has no sch_netem")

    def _build(self, i: int, host: Host) -> None:
        self._add(host.namespace)
        router_side, wan = f"h{i}", f"{WAN_NET}.{i}"
        if host.home_namespace is None:
            self._veth(self.router, router_side, host.namespace, "eth0")
            self._address(self.router, router_side, f"{wan}.1/24")
            self._address(host.namespace, "eth0", f"{wan}.2/24", gateway=f"{wan}.1")
        else:
            home, lan = host.home_namespace, f"{LAN_NET}.{i}"
            self._add(home)
            self._forward(home)
            self._veth(self.router, router_side, home, "wan")
            self._address(self.router, router_side, f"{wan}.1/24")
            self._address(home, "wan", f"{wan}.2/24", gateway=f"{wan}.1")
            self._veth(home, "lan", host.namespace, "eth0")
            self._address(home, "lan", f"{lan}.1/24")
            self._address(host.namespace, "eth0", f"{lan}.2/24", gateway=f"{lan}.1")
            netns.run("ip", "netns", "exec", home, "nft", "-f", "-", stdin=HOME_NAT_RULES)
            netns.run("ip", "-n", self.router, "route", "add", f"{lan}.0/24", "via", f"{wan}.2")
        link = host.spec.link
        delay_ms = link.delay_ms if self.netem else 0.0
        if link.up_bps:
            shaping.cap(*host.uplink, link.up_bps, delay_ms)
        if link.down_bps:
            shaping.cap(*host.downlink, link.down_bps, delay_ms)

    def _add(self, namespace: str) -> None:
        self._namespaces.append(namespace)  # before it exists: shutdown removes half-builds
        netns.add(namespace)

    @staticmethod
    def _forward(namespace: str) -> None:
        netns.run("ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    @staticmethod
    def _veth(namespace: str, device: str, peer_namespace: str, peer_device: str) -> None:
        # Made inside the namespaces: nothing is ever created among the machine's own
        # interfaces, and interface names cannot clash with another lab's.
        netns.run(
            "ip", "-n", namespace, "link", "add", device, "type", "veth",
            "peer", "name", peer_device, "netns", peer_namespace,
        )  # fmt: skip

    @staticmethod
    def _address(namespace: str, device: str, cidr: str, gateway: str | None = None) -> None:
        netns.run("ip", "-n", namespace, "addr", "add", cidr, "dev", device)
        netns.run("ip", "-n", namespace, "link", "set", device, "up")
        if gateway is not None:
            netns.run("ip", "-n", namespace, "route", "add", "default", "via", gateway)

    def host(self, name: str) -> Host:
        return self.hosts[name]

    def command(self, host: str, args: list[str]) -> list[str]:
        """``args`` as a command line that runs on ``host``."""
        return ["ip", "netns", "exec", self.hosts[host].namespace, *args]

    def spawn(
        self, host: str, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> Started:
        """Start ``args`` on ``host`` in a session of its own (its helpers stay in its
        process group), logging to ``log_dir/<name>.log``; ``env`` adds variables."""
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                self.command(host, args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        started = Started(name, host, popen, log)
        self.started.append(started)
        return started

    def run(self, host: str, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``args`` on ``host`` to completion, capturing its output."""
        return subprocess.run(
            self.command(host, args), capture_output=True, text=True, timeout=timeout
        )

    def uplink_sent_bytes(self, host: str) -> int:
        """Bytes ``host``'s uplink carried since the lab started (its home router's WAN
        behind NAT); the uplink must be capped."""
        return shaping.sent_bytes(*self.hosts[host].uplink)

    def shutdown(self, grace_s: float = 3.0) -> None:
        """Stop every process started on the lab (SIGINT to each group, SIGKILL after
        ``grace_s``), kill whatever else runs in its namespaces and delete them. Signals
        wait until it is done; it can be called again."""
        main = threading.current_thread() is threading.main_thread()
        blocked = {signal.SIGINT, signal.SIGTERM}
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            self._stop_processes(grace_s)
            for namespace in reversed(self._namespaces):
                netns.delete(namespace)
            self._namespaces.clear()
            for leftover in netns.listed(self.prefix):
                netns.delete(leftover)
        finally:
            if main:
                if self._sigterm is not None:
                    signal.signal(signal.SIGTERM, self._sigterm)
                    self._sigterm = None
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)

    def _stop_processes(self, grace_s: float) -> None:
        live = [s for s in self.started if s.popen.poll() is None]
        for started in live:
            _signal_group(started.popen, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for started in live:
            try:
                started.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for started in self.started:
            _signal_group(started.popen, signal.SIGKILL)
            try:
                started.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) did not exit", started.name, started.popen.pid)


def _signal_group(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the lab as Ctrl-C does: the stack unwinds and the lab comes down."""
    raise KeyboardInterrupt(f"signal {signum}")


def _describe(host: Host) -> str:
    link = host.spec.link
    caps = "/".join(f"{rate / 1e6:g}" if rate else "-" for rate in (link.up_bps, link.down_bps))
    where = (
        f"{host.address} behind NAT {host.public_address}" if host.home_namespace else host.address
    )
    return f"{host.name} {where} up/down {caps} Mbit/s"
