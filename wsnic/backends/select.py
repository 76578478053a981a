"""Pick the backends a profile (or a flag) asks for; 'auto' prefers netlink and nftables."""

from __future__ import annotations

from typing import Literal

from wsnic.backends.base import FirewallBackend, LinkBackend
from wsnic.backends.iproute2 import Iproute2LinkBackend
from wsnic.backends.iptables import IptablesFirewallBackend, iptables_available
from wsnic.backends.netlink import NetlinkLinkBackend, netlink_available
from wsnic.backends.nftables import NftablesFirewallBackend, nftables_available
from wsnic.backends.process import ChildProcessBackend
from wsnic.engine.executor import Backends
from wsnic.errors import BackendError

LinkChoice = Literal["iproute2", "netlink", "auto"]
FirewallChoice = Literal["iptables", "nftables", "auto"]


def link_backend(choice: LinkChoice, netns: str | None = None) -> LinkBackend:
    if choice == "netlink" or (choice == "auto" and netlink_available()):
        return NetlinkLinkBackend(netns)
    return Iproute2LinkBackend(netns)


def firewall_backend(choice: FirewallChoice, netns: str | None = None) -> FirewallBackend:
    if choice == "nftables" or (choice == "auto" and nftables_available()):
        return NftablesFirewallBackend(netns)
    if choice == "auto" and not iptables_available():
        raise BackendError(
            "no firewall backend: neither libnftables nor iptables is usable "
            "(Debian: apt-get install nftables iptables)"
        )
    return IptablesFirewallBackend(netns)


def select_backends(
    link: LinkChoice, firewall: FirewallChoice, netns: str | None = None
) -> Backends:
    return Backends(
        link=link_backend(link, netns),
        firewall=firewall_backend(firewall, netns),
        process=ChildProcessBackend(netns),
    )
