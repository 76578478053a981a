"""Pick the backends a profile (or a flag) asks for; 'auto' prefers netlink and nftables.

Each backend module is imported only when it is chosen: a relay worker asks for its link
backend alone and must not pay for the firewall libraries (or pyroute2, when it uses iproute2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from wsnic.errors import BackendError

if TYPE_CHECKING:
    from wsnic.backends.base import FirewallBackend, LinkBackend
    from wsnic.engine.executor import Backends

LinkChoice = Literal["iproute2", "netlink", "auto"]
FirewallChoice = Literal["iptables", "nftables", "auto"]


def link_backend(choice: LinkChoice, netns: str | None = None) -> LinkBackend:
    from wsnic.backends.netlink import NetlinkLinkBackend, netlink_available

    if choice == "netlink" or (choice == "auto" and netlink_available()):
        return NetlinkLinkBackend(netns)
    from wsnic.backends.iproute2 import Iproute2LinkBackend

    return Iproute2LinkBackend(netns)


def firewall_backend(choice: FirewallChoice, netns: str | None = None) -> FirewallBackend:
    from wsnic.backends.iptables import IptablesFirewallBackend, iptables_available
    from wsnic.backends.nftables import NftablesFirewallBackend, nftables_available

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
    from wsnic.backends.process import ChildProcessBackend
    from wsnic.engine.executor import Backends

    return Backends(
        link=link_backend(link, netns),
        firewall=firewall_backend(firewall, netns),
        process=ChildProcessBackend(netns),
    )
