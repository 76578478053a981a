"""compile_plan: golden plans for the shipped profiles, markers against a host snapshot, and a
property test that every valid profile compiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsnic.backends.iproute2 import Iproute2LinkBackend
from wsnic.backends.iptables import IptablesFirewallBackend
from wsnic.backends.netlink import NetlinkLinkBackend
from wsnic.backends.nftables import NftablesFirewallBackend
from wsnic.backends.process import ChildProcessBackend
from wsnic.config.loader import load_profile_file
from wsnic.config.models import Profile
from wsnic.engine.executor import Backends
from wsnic.plan.compiler import compile_plan, stable_mac
from wsnic.plan.observed import HostSnapshot, LinkState, ProcessState, RouteState
from wsnic.plan.plan import Marker
from wsnic.plan.render import render_json, render_text
from wsnic.plan.steps import InstallFirewall, SetSysctl, StartProcess

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"

# A host with an uplink and a default route, as the lab profile's NAT needs.
HOST = HostSnapshot(
    links={"eth0": LinkState("eth0", "", "52:54:00:12:34:56", up=True,
                             addresses=("192.0.2.10/24",))},
    routes=(RouteState("default", "eth0"), RouteState("192.0.2.0/24", "eth0")),
    sysctls={"net.ipv4.ip_forward": "0"},
)


def _backends(link: str, firewall: str) -> Backends:
    return Backends(
        Iproute2LinkBackend() if link == "iproute2" else NetlinkLinkBackend(),
        IptablesFirewallBackend() if firewall == "iptables" else NftablesFirewallBackend(),
        ChildProcessBackend(),
    )


def _render(profile: Profile, backends: Backends) -> str:
    plan = compile_plan(profile, HOST)

    def explain(step):
        backend = backends.for_step(step)
        return backend.name, backend.commands(step)

    line = f"link={backends.link.name}, firewall={backends.firewall.name}, process=process"
    return render_text(plan, explain, line)


@pytest.mark.parametrize("profile,link,firewall", [
    ("default", "iproute2", "iptables"),
    ("lab", "iproute2", "iptables"),
    ("lab", "netlink", "nftables"),
])
def test_golden_plan(profile, link, firewall):
    backends = _backends(link, firewall)
    try:
        text = _render(load_profile_file(REPO / "profiles" / f"{profile}.yaml"), backends)
    finally:
        backends.close()
    golden = GOLDEN / f"{profile}-{link}-{firewall}.plan.txt"
    if os.environ.get("WSNIC_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with WSNIC_UPDATE_GOLDEN=1 once"
    assert text == golden.read_text(), (
        f"the plan for {profile}.yaml changed; if on purpose, regenerate with "
        "WSNIC_UPDATE_GOLDEN=1 and review the diff"
    )


def test_original_defaults_make_the_original_host_changes():
    plan = compile_plan(Profile(), HOST)
    described = [p.step.describe() for p in plan.steps]
    assert described == [
        f"bridge wsbr0 (mac {stable_mac('wsnic', 'wsbr0')})",
        "address 192.168.86.1/24 on wsbr0",
        "link wsbr0 up",
        "process dnsmasq:wsbr0",
    ]
    assert all(p.marker is Marker.CREATE for p in plan.steps)


def test_nat_adds_forwarding_and_the_ruleset_with_the_auto_uplink():
    profile = Profile.model_validate({"networks": [{"nat": {"enabled": True}}]})
    plan = compile_plan(profile, HOST)
    sysctl = [p for p in plan.steps if isinstance(p.step, SetSysctl)]
    firewall = [p.step for p in plan.steps if isinstance(p.step, InstallFirewall)]
    assert sysctl[0].marker is Marker.CHANGE and sysctl[0].step.value == "1"
    assert firewall[0].ruleset.nat[0].uplink == "eth0"
    assert firewall[0].ruleset.nat[0].subnet == "192.168.86.0/24"


def test_stable_mac_is_private_unicast_and_stable():
    mac = stable_mac("lab", "wsbr0")
    first = int(mac.split(":")[0], 16)
    assert first & 0x01 == 0 and first & 0x02 == 2
    assert mac == stable_mac("lab", "wsbr0") != stable_mac("lab", "wsbr1")


def test_foreign_bridge_is_a_conflict():
    host = HostSnapshot(links={"wsbr0": LinkState("wsbr0", "bridge", "02:00:00:00:00:01")})
    plan = compile_plan(Profile(), host)
    assert plan.steps[0].marker is Marker.CONFLICT
    assert "not owned by wsnic:wsnic" in plan.steps[0].reason


def test_our_objects_are_in_sync():
    owner = "wsnic:wsnic"
    host = HostSnapshot(
        links={"wsbr0": LinkState("wsbr0", "bridge", "02:00:00:00:00:01", alias=owner,
                                  up=True, addresses=("192.168.86.1/24",))},
        processes=(ProcessState("dnsmasq:wsbr0", 42, owner),),
    )
    plan = compile_plan(Profile(), host)
    assert [p.marker for p in plan.steps] == [Marker.IN_SYNC] * 4
    assert not plan.pending


def test_overlapping_route_is_a_conflict():
    host = HostSnapshot(routes=(RouteState("192.168.0.0/16", "eth0"),))
    plan = compile_plan(Profile(), host)
    assert plan.steps[1].marker is Marker.CONFLICT
    assert "overlaps the host's route to 192.168.0.0/16 via eth0" in plan.steps[1].reason


def test_missing_uplink_and_missing_default_route_are_conflicts():
    named = Profile.model_validate({"networks": [{"nat": {"enabled": True, "uplink": "eth9"}}]})
    assert "uplink eth9 does not exist" in compile_plan(named, HOST).conflicts[0].reason
    auto = Profile.model_validate({"networks": [{"nat": {"enabled": True}}]})
    assert "no default route" in compile_plan(auto, HostSnapshot()).conflicts[0].reason


def test_user_lease_file_is_kept_and_default_one_is_scratch():
    named = Profile.model_validate({"networks": [{"dhcp": {"lease_file": "/var/lib/x.leases"}}]})
    [dnsmasq] = [p.step for p in compile_plan(named, HOST).steps
                 if isinstance(p.step, StartProcess)]
    assert dnsmasq.files == () and "--dhcp-leasefile=/var/lib/x.leases" in dnsmasq.argv
    [default] = [p.step for p in compile_plan(Profile(), HOST).steps
                 if isinstance(p.step, StartProcess)]
    assert default.files == ("/run/wsnic/wsnic.default.leases",)


def test_json_rendering_has_every_step_with_commands_and_inverse():
    backends = _backends("iproute2", "iptables")
    plan = compile_plan(load_profile_file(REPO / "profiles" / "lab.yaml"), HOST)

    def explain(step):
        b = backends.for_step(step)
        return b.name, b.commands(step)

    data = render_json(plan, explain, {"link": "iproute2"})
    assert len(data["steps"]) == len(plan.steps) == 11
    assert data["changes_pending"] and data["conflicts"] == 0
    assert all(s["commands"] for s in data["steps"])
    sysctl = next(s for s in data["steps"] if s["key"] == "sysctl:net.ipv4.ip_forward")
    assert sysctl["inverse"] is None  # learnt at apply time


@st.composite
def profiles(draw):
    count = draw(st.integers(1, 3))
    indexes = draw(st.lists(st.integers(0, 200), min_size=count, max_size=count, unique=True))
    networks = []
    for n, i in enumerate(indexes):
        networks.append({
            "name": f"n{n}", "path": f"/n{n}", "bridge": f"wsbr{n}",
            # distinct second octets and /16 or longer: never overlapping
            "subnet": f"10.{i}.0.0/{draw(st.integers(16, 29))}",
            "nat": {"enabled": draw(st.booleans())},
            "dhcp": {"enabled": draw(st.booleans()), "lease_time": draw(st.integers(1, 10**6))},
            "iperf": {"enabled": draw(st.booleans())},
        })
    return Profile.model_validate({"name": draw(st.from_regex(r"[a-z][a-z0-9]{0,8}",
                                                              fullmatch=True)),
                                   "networks": networks})


@settings(max_examples=150, deadline=None)
@given(profiles())
def test_every_valid_profile_compiles_deterministically(profile):
    first = compile_plan(profile, HOST)
    assert first == compile_plan(profile, HOST)
    keys = [p.step.key() for p in first.steps]
    assert len(keys) == len(set(keys)), "two steps about the same object"
    for planned in first.steps:
        step = planned.step
        if isinstance(step, SetSysctl):
            step = SetSysctl(step.name, step.value, "0")
        assert step.inverse().inverse() == step
    nat = any(n.nat.enabled for n in profile.networks)
    assert any(isinstance(p.step, InstallFirewall) for p in first.steps) == nat
