"""Does a journaled step still hold on the host? (for `wsnic status` and post-apply verification)"""

from __future__ import annotations

from wsnic.plan.observed import HostSnapshot
from wsnic.plan.steps import (
    AddAddress,
    CreateBridge,
    InstallFirewall,
    SetLinkUp,
    SetSysctl,
    StartProcess,
    Step,
)


def step_holds(step: Step, observed: HostSnapshot) -> bool | None:
    """True/False for steps whose effect is observable; None for the others."""
    match step:
        case CreateBridge(name=name, owner=owner):
            link = observed.links.get(name)
            return link is not None and link.alias == owner and link.kind == "bridge"
        case AddAddress(link=name, address=address):
            link = observed.links.get(name)
            return link is not None and address in link.addresses
        case SetLinkUp(link=name):
            link = observed.links.get(name)
            return link is not None and link.up
        case SetSysctl(name=name, value=value):
            return observed.sysctls.get(name) == value
        case InstallFirewall():
            return observed.firewall_installed
        case StartProcess(name=name, owner=owner):
            return any(p.name == name and p.owner == owner for p in observed.processes)
    return None
