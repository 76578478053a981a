"""Read the host's current state through the backends, for `plan`, `apply` and `status`."""

from __future__ import annotations

from wsnic.engine.executor import Backends
from wsnic.plan.compiler import IP_FORWARD
from wsnic.plan.observed import HostSnapshot
from wsnic.tags import owner_tag


def observe(backends: Backends, instance: str) -> HostSnapshot:
    """What the host has now, as seen by the backends that would change it."""
    forward = backends.link.sysctl(IP_FORWARD)
    return HostSnapshot(
        links={link.name: link for link in backends.link.links()},
        routes=tuple(backends.link.routes()),
        sysctls={IP_FORWARD: forward} if forward is not None else {},
        firewall_installed=backends.firewall.installed(instance),
        processes=tuple(backends.process.running(owner_tag(instance))),
    )
