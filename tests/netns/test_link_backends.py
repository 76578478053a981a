"""Contract suite of the link backends (iproute2, netlink), each run in a throwaway namespace.

Every observation is made with `ip -n NS -json` (tests/helpers/link_snapshot.py), independently
of the backend under test.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.helpers import link_snapshot as snap
from tests.helpers.netns import netns, sh, veth_between
from wsnic.backends.base import LinkBackend
from wsnic.backends.iproute2 import Iproute2LinkBackend
from wsnic.backends.netlink import NetlinkLinkBackend, netlink_available
from wsnic.errors import BackendError
from wsnic.plan.steps import (
    AddAddress,
    CreateBridge,
    DeleteAddress,
    DeleteBridge,
    InstallFirewall,
    Ruleset,
    SetLinkDown,
    SetLinkUp,
    SetSysctl,
    Step,
)

root = pytest.mark.root
BACKENDS = ["iproute2", "netlink"]
OWNER = "wsnic:lab"
MAC = "02:57:53:00:00:01"
FOREIGN_MAC = "02:66:6f:00:00:01"
STEPS: list[Step] = [
    CreateBridge("wsbr0", MAC, OWNER),
    AddAddress("wsbr0", "192.168.86.1/24", OWNER),
    SetLinkUp("wsbr0", OWNER),
]
FORWARD = "net.ipv4.ip_forward"


def make(kind: str, ns: str | None) -> Iproute2LinkBackend | NetlinkLinkBackend:
    return Iproute2LinkBackend(ns) if kind == "iproute2" else NetlinkLinkBackend(ns)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, ns: str) -> Iterator[LinkBackend]:
    b = make(request.param, ns)
    try:
        yield b
    finally:
        b.close()


def apply_all(b: LinkBackend, steps: list[Step]) -> None:
    for step in steps:
        assert b.apply(b.prepare(step)) is None


def undo_all(b: LinkBackend, steps: list[Step]) -> None:
    for step in reversed(steps):
        assert b.apply(step.inverse()) is None


def add_foreign(ns: str, kind: str) -> None:
    """A link named wsbr0 that wsnic did not create."""
    if kind == "veth":
        sh(["ip", "link", "add", "wsbr0", "type", "veth", "peer", "name", "wsfx0"], netns=ns)
        return
    sh(["ip", "link", "add", "dev", "wsbr0", "address", FOREIGN_MAC, "type", "bridge"], netns=ns)
    if kind == "bridge-other-owner":
        sh(["ip", "link", "set", "dev", "wsbr0", "alias", "wsnic:other"], netns=ns)


def host_forwarding() -> str:
    with open("/proc/sys/net/ipv4/ip_forward", encoding="ascii") as fh:
        return fh.read().strip()


# --- rendering (pure) --------------------------------------------------------------------------


def test_iproute2_commands_are_the_exact_argv() -> None:
    b = Iproute2LinkBackend("wsnt-x")
    assert b.commands(STEPS[0]) == [
        f"ip -n wsnt-x link add dev wsbr0 address {MAC} type bridge",
        f"ip -n wsnt-x link set dev wsbr0 alias {OWNER}",
    ]
    assert b.commands(STEPS[1]) == ["ip -n wsnt-x addr add 192.168.86.1/24 brd + dev wsbr0"]
    assert b.commands(STEPS[2]) == ["ip -n wsnt-x link set dev wsbr0 up"]
    assert b.commands(SetSysctl(FORWARD, "1")) == [
        "ip netns exec wsnt-x sysctl -w net.ipv4.ip_forward=1"
    ]
    assert Iproute2LinkBackend().commands(STEPS[0].inverse()) == ["ip link del dev wsbr0"]


def test_netlink_commands_name_the_operations() -> None:
    b = NetlinkLinkBackend("wsnt-x")
    assert b.commands(STEPS[0]) == [
        f"netns wsnt-x: RTM_NEWLINK wsbr0 kind=bridge address={MAC} (create)",
        f"netns wsnt-x: RTM_NEWLINK wsbr0 ifalias={OWNER}",
    ]
    assert b.commands(STEPS[1]) == [
        "netns wsnt-x: RTM_NEWADDR wsbr0 192.168.86.1/24 broadcast=192.168.86.255"
    ]
    assert NetlinkLinkBackend().commands(SetSysctl(FORWARD, "1")) == [
        "write /proc/sys/net/ipv4/ip_forward = 1"
    ]


@pytest.mark.parametrize("kind", BACKENDS)
def test_rendering_refuses_what_is_not_a_link_step(kind: str) -> None:
    b = make(kind, None)
    with pytest.raises(BackendError, match="InstallFirewall"):
        b.commands(InstallFirewall("lab", OWNER, Ruleset()))
    with pytest.raises(BackendError, match="not a CIDR"):
        b.commands(AddAddress("wsbr0", "192.168.86.300/24", OWNER))
    for bad in ("kernel.panic", "net..x", "net.ipv4.conf.a//b.forwarding", "net"):
        with pytest.raises(BackendError, match="net"):
            b.commands(SetSysctl(bad, "1"))


# --- apply, re-apply, undo ---------------------------------------------------------------------


@root
def test_steps_create_the_tagged_bridge(backend: LinkBackend, ns: str) -> None:
    apply_all(backend, STEPS)
    br = snap.link(ns, "wsbr0")
    assert br["linkinfo"]["info_kind"] == "bridge"
    assert br["address"] == MAC
    assert br["ifalias"] == OWNER
    assert "UP" in br["flags"]
    assert [(a["local"], a["prefixlen"], a.get("broadcast")) for a in br["addr_info"]] == [
        ("192.168.86.1", 24, "192.168.86.255")
    ]


@root
def test_reapplying_is_a_no_op(backend: LinkBackend, ns: str) -> None:
    apply_all(backend, STEPS)
    before = snap.normalised(ns)
    apply_all(backend, STEPS)
    assert snap.normalised(ns) == before


@root
def test_inverses_restore_the_listing(backend: LinkBackend, ns: str) -> None:
    before = snap.listing(ns)
    apply_all(backend, STEPS)
    assert snap.listing(ns) != before
    undo_all(backend, STEPS)
    assert snap.listing(ns) == before
    undo_all(backend, STEPS)  # removing what is gone succeeds
    assert snap.listing(ns) == before


@root
def test_removing_absent_objects_succeeds(backend: LinkBackend, ns: str) -> None:
    before = snap.listing(ns)
    for step in (
        DeleteBridge("wsbr0", MAC, OWNER),
        DeleteAddress("wsbr0", "192.168.86.1/24", OWNER),
        SetLinkDown("wsbr0", OWNER),
    ):
        assert backend.apply(step) is None
    assert snap.listing(ns) == before
    backend.apply(STEPS[0])  # the bridge exists, the address does not
    backend.apply(DeleteAddress("wsbr0", "192.168.86.1/24", OWNER))
    backend.apply(SetLinkDown("wsbr0", OWNER))
    assert snap.link(ns, "wsbr0")["addr_info"] == []


@root
def test_address_and_up_need_the_link(backend: LinkBackend) -> None:
    for step in STEPS[1:]:
        with pytest.raises(BackendError, match="does not exist"):
            backend.apply(step)


# --- foreign objects ---------------------------------------------------------------------------


@root
@pytest.mark.parametrize("foreign", ["bridge-untagged", "bridge-other-owner", "veth"])
def test_foreign_link_is_refused_and_untouched(backend: LinkBackend, ns: str,
                                               foreign: str) -> None:
    add_foreign(ns, foreign)
    before = snap.ip_raw(ns, "link", "show")
    addrs_before = snap.ip_raw(ns, "addr", "show")
    with pytest.raises(BackendError, match="not owned by this instance"):
        backend.apply(STEPS[0])
    with pytest.raises(BackendError, match="not owned by this instance"):
        backend.apply(STEPS[0].inverse())
    for step in (*STEPS[1:], *(s.inverse() for s in STEPS[1:])):
        with pytest.raises(BackendError, match=f"not owned by {OWNER}"):
            backend.apply(step)
    assert snap.ip_raw(ns, "link", "show") == before
    assert snap.ip_raw(ns, "addr", "show") == addrs_before


@root
def test_half_created_bridge_is_ours_to_delete(backend: LinkBackend, ns: str) -> None:
    """A bridge with the step's own MAC but no tag yet (create interrupted before the alias)."""
    sh(["ip", "link", "add", "dev", "wsbr0", "address", MAC, "type", "bridge"], netns=ns)
    with pytest.raises(BackendError):
        backend.apply(STEPS[0])  # never adopted for creation
    backend.apply(STEPS[0].inverse())
    assert "wsbr0" not in snap.link_names(ns)


# --- sysctl ------------------------------------------------------------------------------------


@root
def test_sysctl_prepare_records_and_inverse_restores(backend: LinkBackend, ns: str) -> None:
    host_before = host_forwarding()
    original = sh(["cat", "/proc/sys/net/ipv4/ip_forward"], netns=ns).stdout.strip()
    wanted = "0" if original == "1" else "1"
    step = backend.prepare(SetSysctl(FORWARD, wanted))
    assert step == SetSysctl(FORWARD, wanted, original)
    assert backend.sysctl(FORWARD) == original
    assert backend.apply(step) is None
    assert sh(["cat", "/proc/sys/net/ipv4/ip_forward"], netns=ns).stdout.strip() == wanted
    assert backend.sysctl(FORWARD) == wanted
    assert host_forwarding() == host_before
    backend.apply(step.inverse())
    assert sh(["cat", "/proc/sys/net/ipv4/ip_forward"], netns=ns).stdout.strip() == original
    assert host_forwarding() == host_before


@root
def test_sysctl_missing_and_refused_names(backend: LinkBackend) -> None:
    assert backend.sysctl("net.ipv4.no_such_knob") is None
    with pytest.raises(BackendError, match="no such sysctl"):
        backend.prepare(SetSysctl("net.ipv4.no_such_knob", "1"))
    with pytest.raises(BackendError, match=r"only reads and writes net\.\*"):
        backend.sysctl("kernel.hostname")
    with pytest.raises(BackendError, match=r"net\.\*"):
        backend.apply(SetSysctl("kernel.hostname", "pwned", "x"))
    assert backend.sysctl("net.ipv4.conf.lo.forwarding") in ("0", "1")


# --- both backends see and make the same thing -------------------------------------------------


def build_rich_namespace(ns: str, peer: str) -> None:
    """Bridge with a port and an address, a veth uplink with a default and a host route."""
    sh(["ip", "link", "add", "dev", "wsbr0", "address", MAC, "type", "bridge"], netns=ns)
    sh(["ip", "link", "set", "dev", "wsbr0", "alias", OWNER, "up"], netns=ns)
    sh(["ip", "addr", "add", "192.168.86.1/24", "brd", "+", "dev", "wsbr0"], netns=ns)
    sh(["ip", "tuntap", "add", "dev", "wstap0", "mode", "tap"], netns=ns)
    sh(["ip", "link", "set", "dev", "wstap0", "master", "wsbr0", "up"], netns=ns)
    veth_between(ns, "wsup0", peer, "wsup1")
    sh(["ip", "addr", "add", "10.9.0.1/24", "dev", "wsup0"], netns=ns)
    sh(["ip", "link", "set", "dev", "wsup0", "up"], netns=ns)
    sh(["ip", "route", "add", "default", "via", "10.9.0.2", "dev", "wsup0"], netns=ns)
    sh(["ip", "route", "add", "10.8.0.5", "dev", "wsup0"], netns=ns)
    sh(["ip", "route", "add", "blackhole", "10.7.0.0/16"], netns=ns)


@root
def test_both_backends_observe_the_same_state(ns: str) -> None:
    with netns("peer") as peer:
        build_rich_namespace(ns, peer)
        ipr, nl = Iproute2LinkBackend(ns), NetlinkLinkBackend(ns)
        try:
            assert ipr.links() == nl.links()
            assert ipr.routes() == nl.routes()
            links = {state.name: state for state in nl.links()}
        finally:
            nl.close()
        assert links["wsbr0"].kind == "bridge"
        assert links["wsbr0"].alias == OWNER
        assert links["wsbr0"].addresses == ("192.168.86.1/24",)
        assert links["wstap0"].kind == "tun"
        assert links["wstap0"].master == "wsbr0"
        assert links["wsup0"].kind == "veth"
        assert links["lo"].kind == ""
        routes = {(r.destination, r.device) for r in ipr.routes()}
        assert {("default", "wsup0"), ("10.8.0.5/32", "wsup0"), ("10.9.0.0/24", "wsup0"),
                ("192.168.86.0/24", "wsbr0"), ("10.7.0.0/16", None)} <= routes


@root
def test_same_steps_leave_the_same_kernel_state() -> None:
    steps = [
        *STEPS,
        AddAddress("wsbr0", "10.5.0.1/31", OWNER),
        AddAddress("wsbr0", "10.6.0.1/30", OWNER),
        AddAddress("wsbr0", "10.1.2.3/32", OWNER),
        AddAddress("wsbr0", "fd00:86::1/64", OWNER),
        SetSysctl("net.ipv4.conf.wsbr0.forwarding", "1"),
    ]
    states = []
    for kind in BACKENDS:
        with netns("par") as ns:
            b = make(kind, ns)
            try:
                apply_all(b, steps)
                states.append(snap.normalised(ns))
            finally:
                b.close()
    assert states[0] == states[1]
    addrs = {a["local"] for link in states[0]["addrs"] for a in link["addr_info"]}
    assert {"192.168.86.1", "10.5.0.1", "10.6.0.1", "10.1.2.3", "fd00:86::1"} <= addrs


# --- data plane helpers ------------------------------------------------------------------------


@root
def test_attach_port_enslaves_and_raises_the_tap(backend: LinkBackend, ns: str) -> None:
    apply_all(backend, STEPS)
    for tap in ("wstap0", "wstap1"):
        sh(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], netns=ns)
        backend.attach_port(tap, "wsbr0")
        backend.attach_port(tap, "wsbr0")  # again: still fine
        port = snap.link(ns, tap)
        assert port["master"] == "wsbr0"
        assert "UP" in port["flags"]
    # The bridge is recreated (new ifindex): attaching must follow it, not a stale index.
    undo_all(backend, STEPS)
    apply_all(backend, STEPS)
    sh(["ip", "tuntap", "add", "dev", "wstap2", "mode", "tap"], netns=ns)
    backend.attach_port("wstap2", "wsbr0")
    assert snap.link(ns, "wstap2")["master"] == "wsbr0"
    with pytest.raises(BackendError):
        backend.attach_port("wstap9", "wsbr0")
    with pytest.raises(BackendError):
        backend.attach_port("wstap2", "wsbr9")


@root
def test_attach_port_from_a_running_event_loop(backend: LinkBackend, ns: str) -> None:
    """The relay calls attach_port from asyncio; pyroute2's sync API must not see that loop."""
    apply_all(backend, STEPS)
    sh(["ip", "tuntap", "add", "dev", "wstap0", "mode", "tap"], netns=ns)

    async def attach() -> None:
        backend.attach_port("wstap0", "wsbr0")

    asyncio.run(attach())
    assert snap.link(ns, "wstap0")["master"] == "wsbr0"


@root
def test_sweep_removes_only_tagged_links(backend: LinkBackend, ns: str) -> None:
    apply_all(backend, STEPS)
    apply_all(backend, [CreateBridge("wsbr1", "02:57:53:00:00:02", OWNER)])
    sh(["ip", "link", "add", "wsv0", "type", "veth", "peer", "name", "wsv1"], netns=ns)
    sh(["ip", "link", "set", "dev", "wsv0", "alias", OWNER], netns=ns)
    sh(["ip", "link", "add", "fx0", "type", "veth", "peer", "name", "fx1"], netns=ns)
    sh(["ip", "link", "add", "dev", "fxbr", "type", "bridge"], netns=ns)
    apply_all(backend, [CreateBridge("wsbr2", "02:57:53:00:00:03", "wsnic:other")])
    removed = backend.sweep(OWNER)
    assert len(removed) == 3
    assert all(OWNER in text for text in removed)
    assert snap.link_names(ns) == {"lo", "fx0", "fx1", "fxbr", "wsbr2"}
    assert backend.sweep(OWNER) == []
    with pytest.raises(BackendError):
        backend.sweep("")


# --- namespaces that are not there -------------------------------------------------------------


@root
@pytest.mark.parametrize("kind", BACKENDS)
def test_missing_namespace_is_an_error_not_created(kind: str) -> None:
    name = "wsnt-absent-0"
    b = make(kind, name)
    try:
        with pytest.raises(BackendError):
            b.links()
    finally:
        b.close()
    assert name not in sh(["ip", "netns", "list"]).stdout


@root
def test_netlink_is_available_here() -> None:
    assert netlink_available()


def test_prepare_leaves_non_sysctl_steps_alone() -> None:
    for kind in BACKENDS:
        b = make(kind, None)
        for step in STEPS:
            assert b.prepare(step) is step


def test_release_ports_deletes_departed_taps_in_one_batch(backend: LinkBackend, ns: str) -> None:
    for i in range(40):
        sh(["ip", "tuntap", "add", "dev", f"wstap{i}", "mode", "tap"], netns=ns)
    add_foreign(ns, "veth")
    before_foreign = [line for line in sh(["ip", "-o", "link"], netns=ns).stdout.splitlines()
                      if "wstap" not in line]
    backend.release_ports([f"wstap{i}" for i in range(30)] + ["wstap-gone"])
    left = sh(["ip", "-o", "link"], netns=ns).stdout
    assert [f"wstap{i}" for i in range(30, 40) if f"wstap{i}:" in left] == [
        f"wstap{i}" for i in range(30, 40)]
    assert not any(f"wstap{i}:" in left for i in range(30))
    assert [line for line in left.splitlines() if "wstap" not in line] == before_foreign
    backend.release_ports([])  # nothing to do is fine
