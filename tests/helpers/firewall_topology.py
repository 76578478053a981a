"""Namespaces and veth pairs for firewall reachability tests, plus bounded TCP probes.

    upstream (eth0 10.200.0.2/30, route 10.201.0.0/16 via the router)
        │ veth
    router   (up0 10.200.0.1/30, ip_forward=1, bridge-nf-call-iptables=1)
        ├── wsbr0 10.201.1.1/24 ── veth ── nat_guest  (eth0 10.201.1.2/24, default via .1)
        └── wsbr1 10.201.2.1/24 ── veth ── iso_guest  (eth0 10.201.2.2/24, default via .1)
                                └─ veth ── iso_peer   (eth0 10.201.2.3/24, default via .1)

The upstream's route back to the guest subnets means that, without a firewall, inbound
connections and un-NATed traffic work: every negative assertion has a positive twin.
All addresses live inside the namespaces; everything is deleted on exit.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from tests.helpers.netns import netns, sh, veth_between
from wsnic.backends._netns import call_in_netns
from wsnic.plan.steps import IsolatedNetwork, NatNetwork, Ruleset

UPLINK = "up0"
ROUTER_UPLINK_IP = "10.200.0.1"
UPSTREAM_IP = "10.200.0.2"
NAT_BRIDGE = "wsbr0"
NAT_SUBNET = "10.201.1.0/24"
NAT_GATEWAY = "10.201.1.1"
NAT_GUEST_IP = "10.201.1.2"
ISO_BRIDGE = "wsbr1"
ISO_GATEWAY = "10.201.2.1"
ISO_GUEST_IP = "10.201.2.2"
ISO_PEER_IP = "10.201.2.3"
PORT = 7007


@dataclass(frozen=True)
class FirewallTopology:
    router: str
    upstream: str
    nat_guest: str
    iso_guest: str
    iso_peer: str

    @staticmethod
    def ruleset() -> Ruleset:
        return Ruleset(
            nat=(NatNetwork(NAT_BRIDGE, NAT_SUBNET, UPLINK),),
            isolated=(IsolatedNetwork(ISO_BRIDGE),),
        )


def _bridge(router: str, name: str, address: str) -> None:
    sh(["ip", "-n", router, "link", "add", name, "type", "bridge", "forward_delay", "0"])
    sh(["ip", "-n", router, "addr", "add", address, "dev", name])
    sh(["ip", "-n", router, "link", "set", name, "up"])


def _guest(router: str, bridge: str, port: str, guest: str, address: str, gateway: str) -> None:
    veth_between(router, port, guest, "eth0")
    sh(["ip", "-n", router, "link", "set", port, "master", bridge, "up"])
    sh(["ip", "-n", guest, "addr", "add", address, "dev", "eth0"])
    sh(["ip", "-n", guest, "link", "set", "eth0", "up"])
    sh(["ip", "-n", guest, "route", "add", "default", "via", gateway])


@contextlib.contextmanager
def firewall_topology() -> Iterator[FirewallTopology]:
    with contextlib.ExitStack() as stack:
        router = stack.enter_context(netns("fwrt"))
        upstream = stack.enter_context(netns("fwup"))
        nat_guest = stack.enter_context(netns("fwgn"))
        iso_guest = stack.enter_context(netns("fwgi"))
        iso_peer = stack.enter_context(netns("fwgp"))
        # Only inside the router namespace; bridged traffic then traverses the forward hook too.
        sh(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=router)
        sh(["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"], netns=router)
        veth_between(router, UPLINK, upstream, "eth0")
        sh(["ip", "-n", router, "addr", "add", f"{ROUTER_UPLINK_IP}/30", "dev", UPLINK])
        sh(["ip", "-n", router, "link", "set", UPLINK, "up"])
        sh(["ip", "-n", upstream, "addr", "add", f"{UPSTREAM_IP}/30", "dev", "eth0"])
        sh(["ip", "-n", upstream, "link", "set", "eth0", "up"])
        sh(["ip", "-n", upstream, "route", "add", "10.201.0.0/16", "via", ROUTER_UPLINK_IP])
        _bridge(router, NAT_BRIDGE, f"{NAT_GATEWAY}/24")
        _bridge(router, ISO_BRIDGE, f"{ISO_GATEWAY}/24")
        _guest(router, NAT_BRIDGE, "vgn0", nat_guest, f"{NAT_GUEST_IP}/24", NAT_GATEWAY)
        _guest(router, ISO_BRIDGE, "vgi0", iso_guest, f"{ISO_GUEST_IP}/24", ISO_GATEWAY)
        _guest(router, ISO_BRIDGE, "vgp0", iso_peer, f"{ISO_PEER_IP}/24", ISO_GATEWAY)
        yield FirewallTopology(router, upstream, nat_guest, iso_guest, iso_peer)


class PeerReporter:
    """A TCP server inside a namespace that sends each client the address it sees it at."""

    def __init__(self, ns: str, port: int = PORT) -> None:
        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(16)
            s.settimeout(0.2)  # so the accept loop notices close() promptly
            return s

        self._sock = call_in_netns(ns, listen)  # the socket stays in `ns` on any thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                with contextlib.suppress(OSError):
                    conn.sendall(peer[0].encode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


@contextlib.contextmanager
def peer_reporters(*namespaces: str) -> Iterator[None]:
    servers = [PeerReporter(ns) for ns in namespaces]
    try:
        yield
    finally:
        for server in servers:
            server.close()


def tcp_probe(ns: str, address: str, port: int = PORT, timeout: float = 3.0) -> str | None:
    """Connect from inside `ns`; the address the server saw us at, or None (no connection)."""

    def probe() -> str | None:
        try:
            with socket.create_connection((address, port), timeout=timeout) as s:
                return s.recv(64).decode() or None
        except OSError:  # timed out (dropped), refused or unreachable
            return None

    return call_in_netns(ns, probe)
