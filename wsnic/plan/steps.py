"""Steps: small immutable values that say what to change on the host and how to undo it.

A step is pure data. It knows its stable `key` (what object it is about), a one-line `describe()`,
its `inverse()`, and which backend kind runs it. Backends give steps their meaning; the journal
stores them with `to_json()` / `step_from_json()`.

Inverse pairs carry the same fields, so `step.inverse().inverse() == step` always holds once any
prior value has been recorded (see `SetSysctl.previous` and `StartProcess.pid`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

BackendKind = Literal["link", "firewall", "process"]


@dataclass(frozen=True)
class Step:
    backend: ClassVar[BackendKind]

    def key(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def inverse(self) -> Step:
        raise NotImplementedError

    @property
    def is_removal(self) -> bool:
        """True for the undo half of a pair (what rollback runs)."""
        return False

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": type(self).__name__}
        for field in dataclasses.fields(self):
            data[field.name] = _to_json_value(getattr(self, field.name))
        return data


def _to_json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json_value(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


# --- links -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateBridge(Step):
    backend: ClassVar[BackendKind] = "link"
    name: str
    mac: str
    owner: str

    def key(self) -> str:
        return f"link:{self.name}"

    def describe(self) -> str:
        return f"bridge {self.name} (mac {self.mac})"

    def inverse(self) -> Step:
        return DeleteBridge(self.name, self.mac, self.owner)


@dataclass(frozen=True)
class DeleteBridge(Step):
    backend: ClassVar[BackendKind] = "link"
    name: str
    mac: str
    owner: str

    def key(self) -> str:
        return f"link:{self.name}"

    def describe(self) -> str:
        return f"delete bridge {self.name}"

    def inverse(self) -> Step:
        return CreateBridge(self.name, self.mac, self.owner)

    @property
    def is_removal(self) -> bool:
        return True


@dataclass(frozen=True)
class AddAddress(Step):
    backend: ClassVar[BackendKind] = "link"
    link: str
    address: str  # CIDR of the interface address, e.g. 192.168.86.1/24
    owner: str

    def key(self) -> str:
        return f"address:{self.link}:{self.address}"

    def describe(self) -> str:
        return f"address {self.address} on {self.link}"

    def inverse(self) -> Step:
        return DeleteAddress(self.link, self.address, self.owner)


@dataclass(frozen=True)
class DeleteAddress(Step):
    backend: ClassVar[BackendKind] = "link"
    link: str
    address: str
    owner: str

    def key(self) -> str:
        return f"address:{self.link}:{self.address}"

    def describe(self) -> str:
        return f"remove address {self.address} from {self.link}"

    def inverse(self) -> Step:
        return AddAddress(self.link, self.address, self.owner)

    @property
    def is_removal(self) -> bool:
        return True


@dataclass(frozen=True)
class SetLinkUp(Step):
    backend: ClassVar[BackendKind] = "link"
    link: str
    owner: str

    def key(self) -> str:
        return f"up:{self.link}"

    def describe(self) -> str:
        return f"link {self.link} up"

    def inverse(self) -> Step:
        return SetLinkDown(self.link, self.owner)


@dataclass(frozen=True)
class SetLinkDown(Step):
    backend: ClassVar[BackendKind] = "link"
    link: str
    owner: str

    def key(self) -> str:
        return f"up:{self.link}"

    def describe(self) -> str:
        return f"link {self.link} down"

    def inverse(self) -> Step:
        return SetLinkUp(self.link, self.owner)

    @property
    def is_removal(self) -> bool:
        return True


@dataclass(frozen=True)
class SetSysctl(Step):
    """Set a sysctl. `previous` is observed by the backend right before applying, so that the
    inverse restores exactly what was there; None means "not observed yet"."""

    backend: ClassVar[BackendKind] = "link"
    name: str
    value: str
    previous: str | None = None

    def key(self) -> str:
        return f"sysctl:{self.name}"

    def describe(self) -> str:
        if self.previous is None:
            return f"sysctl {self.name} = {self.value}"
        return f"sysctl {self.name} = {self.value} (was {self.previous})"

    def inverse(self) -> Step:
        if self.previous is None:
            raise ValueError(f"sysctl {self.name}: the previous value was never observed")
        return SetSysctl(self.name, self.previous, self.value)


# --- firewall ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NatNetwork:
    """Masquerade `subnet` out of `uplink`; inbound only for established traffic."""

    bridge: str
    subnet: str
    uplink: str


@dataclass(frozen=True)
class IsolatedNetwork:
    """No forwarding into or out of `bridge` (its guests only reach the host and each other)."""

    bridge: str


@dataclass(frozen=True)
class Ruleset:
    nat: tuple[NatNetwork, ...] = ()
    isolated: tuple[IsolatedNetwork, ...] = ()


@dataclass(frozen=True)
class InstallFirewall(Step):
    """The whole ruleset of an instance, installed in one transaction. `fresh_tables` names
    shared tables the install brings into being (iptables-nft creates `ip nat`/`ip filter` on
    first use); the backend records them at apply time so that removal drops them again once
    they are empty, and the host's ruleset reads exactly as before."""

    backend: ClassVar[BackendKind] = "firewall"
    instance: str
    owner: str
    ruleset: Ruleset
    fresh_tables: tuple[str, ...] = ()

    def key(self) -> str:
        return f"firewall:{self.instance}"

    def describe(self) -> str:
        parts = [f"nat {n.subnet} via {n.uplink}" for n in self.ruleset.nat]
        parts += [f"isolate {i.bridge}" for i in self.ruleset.isolated]
        return f"firewall ruleset wsnic {self.instance}: " + ", ".join(parts)

    def inverse(self) -> Step:
        return RemoveFirewall(self.instance, self.owner, self.ruleset, self.fresh_tables)


@dataclass(frozen=True)
class RemoveFirewall(Step):
    backend: ClassVar[BackendKind] = "firewall"
    instance: str
    owner: str
    ruleset: Ruleset
    fresh_tables: tuple[str, ...] = ()

    def key(self) -> str:
        return f"firewall:{self.instance}"

    def describe(self) -> str:
        return f"remove firewall ruleset wsnic {self.instance}"

    def inverse(self) -> Step:
        return InstallFirewall(self.instance, self.owner, self.ruleset, self.fresh_tables)

    @property
    def is_removal(self) -> bool:
        return True


# --- child processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StartProcess(Step):
    """Start a supervised child (dnsmasq, iperf). `pid` and `start_time` identify the running
    child once started (start_time in clock ticks since boot, from /proc/PID/stat), so that a
    reused pid is never killed. `files` are removed when the child is stopped."""

    backend: ClassVar[BackendKind] = "process"
    name: str
    argv: tuple[str, ...]
    owner: str
    files: tuple[str, ...] = ()
    pid: int | None = None
    start_time: int | None = None

    def key(self) -> str:
        return f"process:{self.name}"

    def describe(self) -> str:
        return f"process {self.name}"

    def inverse(self) -> Step:
        return StopProcess(self.name, self.argv, self.owner, self.files, self.pid, self.start_time)


@dataclass(frozen=True)
class StopProcess(Step):
    backend: ClassVar[BackendKind] = "process"
    name: str
    argv: tuple[str, ...]
    owner: str
    files: tuple[str, ...] = ()
    pid: int | None = None
    start_time: int | None = None

    def key(self) -> str:
        return f"process:{self.name}"

    def describe(self) -> str:
        where = f" (pid {self.pid})" if self.pid is not None else ""
        return f"stop process {self.name}{where}"

    def inverse(self) -> Step:
        return StartProcess(self.name, self.argv, self.owner, self.files, self.pid, self.start_time)

    @property
    def is_removal(self) -> bool:
        return True


STEP_TYPES: dict[str, type[Step]] = {
    cls.__name__: cls
    for cls in (
        CreateBridge,
        DeleteBridge,
        AddAddress,
        DeleteAddress,
        SetLinkUp,
        SetLinkDown,
        SetSysctl,
        InstallFirewall,
        RemoveFirewall,
        StartProcess,
        StopProcess,
    )
}


def step_from_json(data: dict[str, Any]) -> Step:
    """Rebuild a step written by `Step.to_json()` (the journal's format)."""
    fields = dict(data)
    type_name = fields.pop("type", None)
    cls = STEP_TYPES.get(str(type_name))
    if cls is None:
        raise ValueError(f"unknown step type {type_name!r}")
    if "ruleset" in fields:
        rs = fields["ruleset"]
        fields["ruleset"] = Ruleset(
            nat=tuple(NatNetwork(**n) for n in rs.get("nat", ())),
            isolated=tuple(IsolatedNetwork(**i) for i in rs.get("isolated", ())),
        )
    for name in ("argv", "files", "fresh_tables"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return cls(**fields)
