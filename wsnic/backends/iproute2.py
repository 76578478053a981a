"""Link backend on the iproute2 command line: `ip [-n NS] …` and `sysctl`, through _run.

Every change is preceded by one read (`ip -d -json addr show dev NAME`) that decides between
"already holds" (no-op), "ours, act" and "not ours, refuse". `commands()` renders exactly the
argv lists `apply()` runs.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from wsnic.backends import _sysctl
from wsnic.backends._run import in_netns, render, run
from wsnic.errors import BackendError
from wsnic.plan.observed import LinkState, RouteState
from wsnic.plan.steps import (
    STEP_TYPES,
    AddAddress,
    CreateBridge,
    DeleteAddress,
    DeleteBridge,
    SetLinkDown,
    SetLinkUp,
    SetSysctl,
    Step,
)

LINK_STEPS = tuple(cls for cls in STEP_TYPES.values() if cls.backend == "link")
MAIN_TABLE = 254
# What `ip` prints when the device named by `dev NAME` is missing (show / set, del).
_MISSING = ("does not exist", "Cannot find device")




def retiring_group() -> int:
    """The link group this process gathers departing client TAPs in before deleting them.

    Deleting a group costs the kernel one RCU grace period for all its links, deleting links
    one by one (or closing their fds) one each: 1000 departing clients take milliseconds
    instead of seconds. The group is this process's own, so that no other process's links are
    ever in it."""
    return 0x57530000 | (os.getpid() & 0xFFFF)


def link_of(step: Step) -> str | None:
    """The link a link step is about (None for a sysctl)."""
    match step:
        case CreateBridge(name=name) | DeleteBridge(name=name):
            return name
        case AddAddress(link=link) | DeleteAddress(link=link):
            return link
        case SetLinkUp(link=link) | SetLinkDown(link=link):
            return link
    return None


def needs_change(step: Step, state: LinkState | None) -> bool:
    """Both link backends' one decision: must `step` act, given its link as observed (None:
    absent)? False when it already holds (an Ensure step in place, a removal of what is gone);
    BackendError for a link wsnic does not own, or a missing link the step needs."""
    what = step.describe()
    match step:
        case CreateBridge(owner=owner):
            if state is None:
                return True
            if is_our_bridge(state, owner):
                return False
            raise refuse_foreign(state, step)
        case DeleteBridge(owner=owner):
            if state is None:
                return False
            if is_our_bridge(state, owner) or is_half_created(state, step):
                return True
            raise refuse_foreign(state, step)
        case AddAddress(owner=owner, address=address):
            check_owned(_existing(state, step), owner, what)
            return not has_address(_existing(state, step), address)
        case SetLinkUp(owner=owner):
            check_owned(_existing(state, step), owner, what)
            return not _existing(state, step).up
        case DeleteAddress(owner=owner, address=address):
            if state is None:
                return False
            check_owned(state, owner, what)
            return has_address(state, address)
        case SetLinkDown(owner=owner):
            if state is None:
                return False
            check_owned(state, owner, what)
            return state.up
    return True  # a sysctl is written whatever it holds: prepare recorded the old value


def _existing(state: LinkState | None, step: Step) -> LinkState:
    if state is None:
        raise BackendError(f"{step.describe()}: link {link_of(step)} does not exist")
    return state


def has_address(state: LinkState, address: str) -> bool:
    wanted = parse_interface(state.name, address)
    return any(parse_interface(state.name, have) == wanted for have in state.addresses)

def prepare_link_step(backend: str, step: Step, sysctl: Callable[[str], str | None]) -> Step:
    """Both link backends' prepare: refuse foreign step kinds; record a sysctl's value."""
    if not isinstance(step, LINK_STEPS):
        raise unsupported(backend, step)
    if isinstance(step, SetSysctl):
        current = sysctl(step.name)
        if current is None:
            raise BackendError(f"sysctl {step.name}: no such sysctl in this namespace")
        return SetSysctl(step.name, step.value, current)
    return step

def parse_interface(link: str, address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """The interface address of an Add/DeleteAddress step, or BackendError naming it."""
    try:
        return ipaddress.ip_interface(address)
    except ValueError:
        raise BackendError(f"address {address!r} on {link}: not a CIDR address") from None


def check_owned(state: LinkState, owner: str, action: str) -> None:
    """Refuse to touch a link that does not carry our ownership tag."""
    if state.alias != owner:
        tag = "no owner tag" if state.alias is None else f"owner tag {state.alias!r}"
        raise BackendError(
            f"{action}: link {state.name} exists with {tag}; it is not owned by {owner}, "
            "so wsnic leaves it alone"
        )


def is_our_bridge(state: LinkState, owner: str) -> bool:
    return state.kind == "bridge" and state.alias == owner


def is_half_created(state: LinkState, step: DeleteBridge) -> bool:
    """A bridge with our exact MAC but no alias: a CreateBridge interrupted between creating the
    bridge and tagging it (the kernel ignores an alias in the create request itself)."""
    return state.kind == "bridge" and state.alias is None and state.mac == step.mac.lower()


def refuse_foreign(state: LinkState, step: CreateBridge | DeleteBridge) -> BackendError:
    what = f"a {state.kind}" if state.kind else "a device"
    tag = "no owner tag" if state.alias is None else f"owner tag {state.alias!r}"
    verb = "create" if isinstance(step, CreateBridge) else "delete"
    return BackendError(
        f"{verb} bridge {step.name}: {step.name} exists ({what}, {tag}) and is not owned by "
        f"this instance ({step.owner}); wsnic leaves it alone"
    )


def unsupported(backend: str, step: Step) -> BackendError:
    return BackendError(f"{backend} link backend cannot handle {type(step).__name__} steps")


def route_destination(dst: str | None, dst_len: int) -> str:
    """A route's destination as a CIDR string, "default" for 0.0.0.0/0."""
    if dst is None or dst_len == 0:
        return "default"
    return f"{dst}/{dst_len}"


class Iproute2LinkBackend:
    """LinkBackend that runs `ip` and `sysctl` (inside `netns` when given)."""

    name = "iproute2"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def close(self) -> None:
        """Nothing to release (every command is its own process)."""

    # --- rendering -------------------------------------------------------------------------

    def _ip(self, *args: str) -> list[str]:
        ns = ["-n", self.netns] if self.netns is not None else []
        return ["ip", *ns, *args]

    def _argvs(self, step: Step) -> list[list[str]]:
        match step:
            case CreateBridge(name=name, mac=mac, owner=owner):
                return [
                    self._ip("link", "add", "dev", name, "address", mac, "type", "bridge"),
                    self._ip("link", "set", "dev", name, "alias", owner),
                ]
            case DeleteBridge(name=name):
                return [self._ip("link", "del", "dev", name)]
            case AddAddress(link=link, address=address):
                iface = parse_interface(link, address)
                brd = ["brd", "+"] if iface.version == 4 else []
                return [self._ip("addr", "add", str(iface), *brd, "dev", link)]
            case DeleteAddress(link=link, address=address):
                iface = parse_interface(link, address)
                return [self._ip("addr", "del", str(iface), "dev", link)]
            case SetLinkUp(link=link):
                return [self._ip("link", "set", "dev", link, "up")]
            case SetLinkDown(link=link):
                return [self._ip("link", "set", "dev", link, "down")]
            case SetSysctl(name=name, value=value):
                _sysctl.check_net_sysctl(name)
                return [["sysctl", "-w", f"{name}={_sysctl.check_value(name, value)}"]]
        raise unsupported(self.name, step)

    def commands(self, step: Step) -> list[str]:
        if isinstance(step, SetSysctl):
            return [render(in_netns(argv, self.netns)) for argv in self._argvs(step)]
        return [render(argv) for argv in self._argvs(step)]

    # --- observing -------------------------------------------------------------------------

    def _json(self, argv: list[str]) -> list[dict[str, Any]]:
        result = run(argv)
        return _load(argv, result.stdout)

    def _get(self, name: str) -> LinkState | None:
        argv = self._ip("-d", "-json", "addr", "show", "dev", name)
        result = run(argv, check=False)
        if result.returncode != 0:
            if any(text in result.stderr for text in _MISSING):
                return None
            raise BackendError(f"{render(argv)} failed: {result.stderr.strip()}")
        states = [_link_state(item) for item in _load(argv, result.stdout)]
        return states[0] if states else None

    def links(self) -> list[LinkState]:
        return [_link_state(item) for item in self._json(self._ip("-d", "-json", "addr", "show"))]

    def routes(self) -> list[RouteState]:
        argv = self._ip("-4", "-json", "route", "show", "table", "main")
        return [_route_state(item) for item in self._json(argv)]

    def sysctl(self, name: str) -> str | None:
        argv = ["sysctl", "-n", _sysctl.check_net_sysctl(name)]
        result = run(argv, netns=self.netns, check=False)
        if result.returncode != 0:
            if "No such file or directory" in result.stderr:
                return None
            raise BackendError(
                f"{render(in_netns(argv, self.netns))} failed: {result.stderr.strip()}"
            )
        return _sysctl.clean(result.stdout)

    # --- changing --------------------------------------------------------------------------

    def prepare(self, step: Step) -> Step:
        return prepare_link_step(self.name, step, self.sysctl)

    def apply(self, step: Step) -> Step | None:
        argvs = self._argvs(step)  # validates the step before anything is read or changed
        name = link_of(step)
        if not needs_change(step, self._get(name) if name is not None else None):
            return None
        match step:
            case CreateBridge():
                self._create_bridge(step, argvs)
            case DeleteBridge() | SetLinkDown():
                self._run_tolerating_missing(argvs[0])
            case SetSysctl():
                run(argvs[0], netns=self.netns)
            case _:
                run(argvs[0])
        return None

    def _create_bridge(self, step: CreateBridge, argvs: list[list[str]]) -> None:
        run(argvs[0])
        try:
            run(argvs[1])
        except BackendError:
            # An untagged bridge would look foreign to every later step: take it away again.
            self._run_tolerating_missing(self._ip("link", "del", "dev", step.name))
            raise

    def _run_tolerating_missing(self, argv: list[str]) -> None:
        """Run argv; a device that vanished meanwhile is what we wanted anyway."""
        result = run(argv, check=False)
        if result.returncode != 0 and not any(text in result.stderr for text in _MISSING):
            raise BackendError(
                f"{render(argv)} failed with exit code {result.returncode}: "
                f"{result.stderr.strip()}"
            )

    def attach_port(self, port: str, bridge: str) -> None:
        run(self._ip("link", "set", "dev", port, "master", bridge, "up"))

    def release_ports(self, ports: Sequence[str]) -> None:
        group = str(retiring_group())
        for port in ports:
            self._run_tolerating_missing(self._ip("link", "set", "dev", port, "group", group))
        if ports:
            # ENODEV here means the group is empty: every port had already gone.
            result = run(self._ip("link", "del", "group", group), check=False)
            if result.returncode != 0 and "No such device" not in result.stderr:
                raise BackendError(f"ip link del group {group}: {result.stderr.strip()}")

    def sweep(self, owner: str) -> list[str]:
        if not owner:
            raise BackendError("sweep: refusing an empty owner tag")
        removed = []
        for state in self.links():
            if state.alias == owner:
                self._run_tolerating_missing(self._ip("link", "del", "dev", state.name))
                removed.append(f"link {state.name} ({state.kind or 'device'}, {owner})")
        return removed


def _load(argv: list[str], text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise BackendError(f"{render(argv)}: unreadable JSON output ({exc})") from None
    if not isinstance(data, list):
        raise BackendError(f"{render(argv)}: expected a JSON list, got {type(data).__name__}")
    return [item for item in data if isinstance(item, dict)]


def _link_state(item: dict[str, Any]) -> LinkState:
    linkinfo = item.get("linkinfo") or {}
    addresses = tuple(
        f"{a['local']}/{a['prefixlen']}"
        for a in item.get("addr_info", [])
        if "local" in a and "prefixlen" in a
    )
    return LinkState(
        name=str(item["ifname"]),
        kind=str(linkinfo.get("info_kind", "")),
        mac=str(item.get("address", "")).lower(),
        alias=item.get("ifalias"),
        up="UP" in item.get("flags", []),
        addresses=addresses,
        master=item.get("master"),
    )


def _route_state(item: dict[str, Any]) -> RouteState:
    dst = str(item.get("dst", "default"))
    if dst != "default" and "/" not in dst:
        dst += "/32"  # `ip` prints host routes without their prefix length
    if dst == "0.0.0.0/0":
        dst = "default"
    return RouteState(destination=dst, device=item.get("dev"))
