"""compile_plan: profile + host snapshot -> plan. Pure and deterministic: it reads nothing.

For the original's configuration it produces the host changes the original made, in its order:
bridge (private, stable MAC), address, link up, NAT rules, dnsmasq, iperf; plus the IP forwarding
sysctl when NAT is on, whose old value the executor records so that it comes back.
"""

from __future__ import annotations

import hashlib
import ipaddress

from wsnic.config.models import Network, Profile
from wsnic.plan.observed import HostSnapshot
from wsnic.plan.plan import Marker, Plan, PlannedStep
from wsnic.plan.steps import (
    AddAddress,
    CreateBridge,
    InstallFirewall,
    IsolatedNetwork,
    NatNetwork,
    Ruleset,
    SetLinkUp,
    SetSysctl,
    StartProcess,
)
from wsnic.services.dnsmasq import default_lease_file, dnsmasq_argv
from wsnic.services.iperf import iperf_argv

IP_FORWARD = "net.ipv4.ip_forward"


def stable_mac(instance: str, bridge: str) -> str:
    """A locally administered unicast MAC derived from the instance and bridge names.

    The original picks a random private MAC; deriving it keeps plans deterministic and gives the
    guests the same gateway MAC across restarts (no stale ARP entries)."""
    digest = bytearray(hashlib.sha256(f"{instance}/{bridge}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


def resolve_uplink(network: Network, observed: HostSnapshot) -> str | None:
    """The uplink a NAT network uses: as configured, or the default route's device for 'auto'."""
    if network.nat.uplink != "auto":
        return network.nat.uplink
    return observed.default_route_device()


def compile_plan(profile: Profile, observed: HostSnapshot) -> Plan:
    owner = profile.owner()
    planned: list[PlannedStep] = []
    for network in profile.networks:
        planned.extend(_network_steps(profile, network, observed))
    if any(n.nat.enabled for n in profile.networks):
        planned.append(_mark_sysctl(SetSysctl(IP_FORWARD, "1"), observed))
        planned.append(_firewall(profile, observed))
    for network in profile.networks:
        planned.extend(_service_steps(profile, network, observed))
    return Plan(instance=profile.name, owner=owner, steps=tuple(planned))


def _network_steps(
    profile: Profile, network: Network, observed: HostSnapshot
) -> list[PlannedStep]:
    owner = profile.owner()
    bridge = network.bridge
    address = f"{network.gateway}/{network.subnet.prefixlen}"
    link = observed.links.get(bridge)
    ours = link is not None and link.alias == owner and link.kind == "bridge"

    steps: list[PlannedStep] = []
    bridge_step = CreateBridge(bridge, stable_mac(profile.name, bridge), owner)
    if link is None:
        steps.append(PlannedStep(bridge_step, Marker.CREATE))
    elif ours:
        steps.append(PlannedStep(bridge_step, Marker.IN_SYNC))
    else:
        tag = f"alias {link.alias!r}" if link.alias else "no wsnic tag"
        steps.append(
            PlannedStep(
                bridge_step,
                Marker.CONFLICT,
                f"a {link.kind or 'link'} named {bridge} already exists with {tag}; "
                f"it is not owned by {owner}",
            )
        )

    address_step = AddAddress(bridge, address, owner)
    overlap = _overlapping_route(network, profile, observed)
    if overlap:
        steps.append(PlannedStep(address_step, Marker.CONFLICT, overlap))
    elif ours and link is not None and address in link.addresses:
        steps.append(PlannedStep(address_step, Marker.IN_SYNC))
    else:
        steps.append(PlannedStep(address_step, Marker.CREATE))

    up_step = SetLinkUp(bridge, owner)
    if ours and link is not None and link.up:
        steps.append(PlannedStep(up_step, Marker.IN_SYNC))
    else:
        steps.append(PlannedStep(up_step, Marker.CREATE))
    return steps


def _overlapping_route(network: Network, profile: Profile, observed: HostSnapshot) -> str:
    """Why the subnet would clash with a route the host already has (not one of ours), or ''."""
    own_bridges = {
        name for name, link in observed.links.items() if link.alias == profile.owner()
    }
    for route in observed.routes:
        if route.destination == "default" or route.device in own_bridges:
            continue
        try:
            destination = ipaddress.ip_network(route.destination, strict=False)
        except ValueError:
            continue
        if destination.version == 4 and destination.overlaps(network.subnet):
            return (
                f"subnet {network.subnet} overlaps the host's route to {destination} "
                f"via {route.device}; choose another subnet"
            )
    return ""


def _mark_sysctl(step: SetSysctl, observed: HostSnapshot) -> PlannedStep:
    current = observed.sysctls.get(step.name)
    if current == step.value:
        return PlannedStep(step, Marker.IN_SYNC)
    if current is None:
        return PlannedStep(step, Marker.CHANGE)
    return PlannedStep(step, Marker.CHANGE, f"was {current}")


def _firewall(profile: Profile, observed: HostSnapshot) -> PlannedStep:
    nat: list[NatNetwork] = []
    isolated: list[IsolatedNetwork] = []
    problems: list[str] = []
    for network in profile.networks:
        if not network.nat.enabled:
            isolated.append(IsolatedNetwork(network.bridge))
            continue
        uplink = resolve_uplink(network, observed)
        if uplink is None:
            problems.append(
                f"network {network.name!r}: no default route to take the uplink from; "
                "set nat.uplink (flag -f)"
            )
            uplink = "auto"
        elif uplink not in observed.links:
            problems.append(f"network {network.name!r}: uplink {uplink} does not exist")
        nat.append(NatNetwork(network.bridge, str(network.subnet), uplink))
    step = InstallFirewall(
        profile.name, profile.owner(), Ruleset(nat=tuple(nat), isolated=tuple(isolated))
    )
    if problems:
        return PlannedStep(step, Marker.CONFLICT, "; ".join(problems))
    if observed.firewall_installed:
        return PlannedStep(step, Marker.IN_SYNC)
    return PlannedStep(step, Marker.CREATE)


def _service_steps(
    profile: Profile, network: Network, observed: HostSnapshot
) -> list[PlannedStep]:
    owner = profile.owner()
    running = {p.name for p in observed.processes if p.owner == owner}
    steps: list[StartProcess] = []
    if network.dhcp.enabled:
        # A lease file the user named is theirs to keep; our default one is scratch.
        scratch: tuple[str, ...] = ()
        if network.dhcp.lease_file is not None:
            lease_file = str(network.dhcp.lease_file)
        else:
            lease_file = default_lease_file(profile.state_dir, profile.name, network.name)
            scratch = (lease_file,)
        steps.append(
            StartProcess(
                f"dnsmasq:{network.bridge}",
                dnsmasq_argv(network, lease_file),
                owner,
                files=scratch,
            )
        )
    if network.iperf.enabled:
        steps.append(StartProcess(f"iperf:{network.bridge}", iperf_argv(network), owner))
    return [
        PlannedStep(s, Marker.IN_SYNC if s.name in running else Marker.CREATE)
        for s in steps
    ]
