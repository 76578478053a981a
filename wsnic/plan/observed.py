"""A snapshot of the host as the backends saw it: plain data handed to the pure compiler."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LinkState:
    name: str
    kind: str  # "bridge", "veth", "tun", "" for a plain device
    mac: str
    alias: str | None = None  # wsnic tags its links with alias "wsnic:<instance>"
    up: bool = False
    addresses: tuple[str, ...] = ()  # CIDR interface addresses, e.g. "192.168.86.1/24"
    master: str | None = None


@dataclass(frozen=True)
class RouteState:
    destination: str  # CIDR network, or "default"
    device: str | None


@dataclass(frozen=True)
class ProcessState:
    name: str  # the StartProcess name, e.g. "dnsmasq:wsbr0"
    pid: int
    owner: str


@dataclass(frozen=True)
class HostSnapshot:
    links: Mapping[str, LinkState] = field(default_factory=dict)
    routes: tuple[RouteState, ...] = ()
    sysctls: Mapping[str, str] = field(default_factory=dict)
    firewall_installed: bool = False  # the instance's own ruleset is present
    processes: tuple[ProcessState, ...] = ()

    def default_route_device(self) -> str | None:
        for route in self.routes:
            if route.destination == "default" and route.device:
                return route.device
        return None
