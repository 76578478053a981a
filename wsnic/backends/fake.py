"""FakeHost: an in-memory host behind every backend Protocol, for unit tests of the planner and
executor only (faults can be injected). Anything that claims to work on a real host is tested on the
real kernel instead."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from wsnic.errors import BackendError
from wsnic.plan.observed import HostSnapshot, LinkState, ProcessState, RouteState
from wsnic.plan.steps import (
    AddAddress,
    CreateBridge,
    DeleteAddress,
    DeleteBridge,
    InstallFirewall,
    RemoveFirewall,
    SetLinkDown,
    SetLinkUp,
    SetSysctl,
    StartProcess,
    Step,
    StopProcess,
)


@dataclass
class FakeHost:
    links: dict[str, LinkState] = field(default_factory=dict)
    routes: list[RouteState] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=lambda: {"net.ipv4.ip_forward": "0"})
    firewalls: dict[str, InstallFirewall] = field(default_factory=dict)
    processes: dict[int, StartProcess] = field(default_factory=dict)
    fail_on: set[str] = field(default_factory=set)  # step type names whose next apply raises once
    applied: list[Step] = field(default_factory=list)
    _pids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def state(self) -> tuple[object, ...]:
        """Everything observable, for before/after comparisons."""
        return (
            dict(self.links),
            list(self.routes),
            dict(self.sysctls),
            dict(self.firewalls),
            {pid: (p.name, p.owner) for pid, p in self.processes.items()},
        )

    def snapshot(self, instance: str) -> HostSnapshot:
        return HostSnapshot(
            links=dict(self.links),
            routes=tuple(self.routes),
            sysctls=dict(self.sysctls),
            firewall_installed=instance in self.firewalls,
            processes=tuple(
                ProcessState(p.name, pid, p.owner) for pid, p in self.processes.items()
            ),
        )

    def apply(self, step: Step) -> Step | None:
        if type(step).__name__ in self.fail_on:
            self.fail_on.discard(type(step).__name__)
            raise BackendError(f"injected fault: {step.describe()}")
        self.applied.append(step)
        match step:
            case CreateBridge(name=name, mac=mac, owner=owner):
                link = self.links.get(name)
                if link is not None and link.alias != owner:
                    raise BackendError(f"{name} exists and is not owned by {owner}")
                if link is None:
                    self.links[name] = LinkState(name, "bridge", mac, alias=owner)
            case DeleteBridge(name=name, owner=owner):
                link = self.links.get(name)
                if link is not None:
                    if link.alias != owner:
                        raise BackendError(f"{name} is not owned by {owner}")
                    del self.links[name]
            case AddAddress(link=name, address=address):
                link = self._own(name, step)
                if address not in link.addresses:
                    self.links[name] = dataclasses.replace(
                        link, addresses=(*link.addresses, address)
                    )
            case DeleteAddress(link=name, address=address):
                if name in self.links:
                    link = self.links[name]
                    self.links[name] = dataclasses.replace(
                        link, addresses=tuple(a for a in link.addresses if a != address)
                    )
            case SetLinkUp(link=name):
                self.links[name] = dataclasses.replace(self._own(name, step), up=True)
            case SetLinkDown(link=name):
                if name in self.links:
                    self.links[name] = dataclasses.replace(self.links[name], up=False)
            case SetSysctl(name=name, value=value):
                self.sysctls[name] = value
            case InstallFirewall(instance=instance):
                self.firewalls[instance] = step
            case RemoveFirewall(instance=instance):
                self.firewalls.pop(instance, None)
            case StartProcess():
                pid = next(self._pids)
                self.processes[pid] = step
                return dataclasses.replace(step, pid=pid, start_time=pid * 10).inverse()
            case StopProcess(pid=pid):
                if pid is not None:
                    self.processes.pop(pid, None)
            case _:
                raise BackendError(f"FakeHost cannot apply {step!r}")
        return None

    def _own(self, name: str, step: Step) -> LinkState:
        link = self.links.get(name)
        if link is None:
            raise BackendError(f"{step.describe()}: link {name} does not exist")
        return link


class FakeBackend:
    """One backend kind of a FakeHost; all kinds share the same host."""

    def __init__(self, host: FakeHost, name: str) -> None:
        self.host = host
        self.name = name

    def commands(self, step: Step) -> list[str]:
        return [f"fake {step.describe()}"]

    def prepare(self, step: Step) -> Step:
        if isinstance(step, SetSysctl):
            return dataclasses.replace(step, previous=self.host.sysctls.get(step.name, "0"))
        return step

    def apply(self, step: Step) -> Step | None:
        return self.host.apply(step)

    # LinkBackend
    def links(self) -> list[LinkState]:
        return list(self.host.links.values())

    def routes(self) -> list[RouteState]:
        return list(self.host.routes)

    def sysctl(self, name: str) -> str | None:
        return self.host.sysctls.get(name)

    def close(self) -> None:
        pass

    def release_ports(self, ports: Sequence[str]) -> None:
        for port in ports:
            self.host.links.pop(port, None)

    def attach_port(self, port: str, bridge: str) -> None:
        self.host.links[port] = LinkState(port, "tun", "02:00:00:00:00:00", up=True, master=bridge)

    # FirewallBackend
    def installed(self, instance: str) -> bool:
        return instance in self.host.firewalls

    # ProcessBackend
    def running(self, owner: str) -> list[ProcessState]:
        return [
            ProcessState(p.name, pid, p.owner)
            for pid, p in self.host.processes.items()
            if p.owner == owner
        ]

    def alive(self, pid: int, start_time: int | None) -> bool:
        return pid in self.host.processes

    def poll_exited(self) -> list[tuple[str, int]]:
        return []

    def sweep(self, owner_or_instance: str) -> list[str]:
        return []
