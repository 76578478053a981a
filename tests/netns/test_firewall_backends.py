"""Contract suite of the firewall backends (nftables, iptables-nft, iptables-legacy).

Every test works in throwaway wsnt- namespaces: the rules are observed with the real tools
(`nft`, `iptables-save`) and their meaning is checked with real TCP traffic between namespaces.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.helpers import firewall_topology as topo
from tests.helpers.netns import netns, sh
from wsnic.backends.base import FirewallBackend
from wsnic.backends.iptables import IptablesFirewallBackend, iptables_available
from wsnic.backends.nftables import NftablesFirewallBackend, nftables_available
from wsnic.errors import BackendError
from wsnic.plan.steps import (
    InstallFirewall,
    IsolatedNetwork,
    NatNetwork,
    Ruleset,
)

pytestmark = pytest.mark.root

KINDS = ["nftables", "iptables", "iptables-legacy"]

RULESET = Ruleset(
    nat=(NatNetwork("wsbr0", "10.201.1.0/24", "up0"),),
    isolated=(IsolatedNetwork("wsbr1"),),
)
INSTALL = InstallFirewall("lab", "wsnic:lab", RULESET)
REMOVE = INSTALL.inverse()

# What `nft list table inet wsnic_lab` must show (written out by hand, not by the code under test).
EXPECTED_NFT_TABLE = """\
table inet wsnic_lab {
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "wsbr1" oifname != "wsbr1" drop comment "wsnic:lab"
		iifname != "wsbr1" oifname "wsbr1" drop comment "wsnic:lab"
		iifname "up0" oifname "wsbr0" ct state established,related accept comment "wsnic:lab"
		iifname "up0" oifname "wsbr0" drop comment "wsnic:lab"
		iifname "wsbr0" oifname "up0" ip daddr 10.201.1.0/24 drop comment "wsnic:lab"
		iifname "wsbr0" oifname "up0" accept comment "wsnic:lab"
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "up0" ip saddr 10.201.1.0/24 masquerade comment "wsnic:lab"
	}
}
"""

_C = '-m comment --comment "wsnic:lab"'
# What iptables-save must show of ours, by table (normalised: no counters).
EXPECTED_IPT = {
    "nat": [
        ":POSTROUTING ACCEPT",
        ":WSNIC-lab-NAT -",
        f"-A POSTROUTING {_C} -j WSNIC-lab-NAT",
        f"-A WSNIC-lab-NAT -s 10.201.1.0/24 -o up0 {_C} -j MASQUERADE",
    ],
    "filter": [
        ":FORWARD ACCEPT",
        ":WSNIC-lab-FWD -",
        f"-A FORWARD {_C} -j WSNIC-lab-FWD",
        f"-A WSNIC-lab-FWD -i wsbr1 ! -o wsbr1 {_C} -j DROP",
        f"-A WSNIC-lab-FWD ! -i wsbr1 -o wsbr1 {_C} -j DROP",
        f"-A WSNIC-lab-FWD -i up0 -o wsbr0 -m conntrack --ctstate RELATED,ESTABLISHED {_C} "
        "-j ACCEPT",
        f"-A WSNIC-lab-FWD -i up0 -o wsbr0 {_C} -j DROP",
        f"-A WSNIC-lab-FWD -d 10.201.1.0/24 -i wsbr0 -o up0 {_C} -j DROP",
        f"-A WSNIC-lab-FWD -i wsbr0 -o up0 {_C} -j ACCEPT",
    ],
}

BUILTIN = {"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"}


# --- helpers -----------------------------------------------------------------------------------


def _binary(kind: str) -> str:
    return "iptables" if kind == "nftables" else kind


def make_backend(kind: str, ns: str) -> FirewallBackend:
    if kind == "nftables":
        if not nftables_available():
            pytest.skip("libnftables is not loadable")
        return NftablesFirewallBackend(ns)
    if not iptables_available(kind):
        pytest.skip(f"{kind} is not installed")
    return IptablesFirewallBackend(ns, binary=kind)


def _strip_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [_strip_handles(v) for v in value]
    return value


def nft_objects(ns: str) -> list[dict[str, Any]]:
    """`nft -j list ruleset` without metainfo and handles."""
    data = json.loads(sh(["nft", "-j", "list", "ruleset"], netns=ns).stdout or '{"nftables":[]}')
    return [_strip_handles(o) for o in data["nftables"] if "metainfo" not in o]


def ipt_save(ns: str, binary: str) -> str:
    return sh([f"{binary}-save"], netns=ns).stdout


def normalise_save(text: str, drop_empty_builtins: bool = False) -> dict[str, list[str]]:
    """iptables-save by table, without `#` lines and counters. With `drop_empty_builtins`,
    built-in chains with policy ACCEPT and no rules (which iptables creates on first use and
    no tool deletes again) are dropped, and so are tables left with nothing in them."""
    tables: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], [])
            continue
        current.append(re.sub(r"\s*\[\d+:\d+\]", "", line))
    if drop_empty_builtins:
        for name, lines in list(tables.items()):
            used = {ln.split()[1] for ln in lines if ln.startswith("-A ")}
            kept = [ln for ln in lines if not (
                ln.startswith(":") and ln[1:].split()[0] in BUILTIN
                and ln.split()[1] == "ACCEPT" and ln[1:].split()[0] not in used)]
            if kept:
                tables[name] = kept
            else:
                del tables[name]
    return tables


def snapshot(kind: str, ns: str, drop_empty_builtins: bool = False) -> dict[str, Any]:
    """Everything the kernel holds in `ns` that either backend could have touched."""
    snap: dict[str, Any] = {"nft": sh(["nft", "list", "ruleset"], netns=ns).stdout}
    if kind != "nftables":
        snap["ipt"] = normalise_save(ipt_save(ns, kind), drop_empty_builtins)
    if drop_empty_builtins:
        # iptables-nft's leftover empty built-in tables are compared through iptables-save.
        snap["nft"] = [o for o in nft_objects(ns)
                       if o.get("table", o.get("chain", o.get("rule", {}))).get("family")
                       not in (("ip",) if kind == "iptables" else ())]
    return snap


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_install_reinstall_remove_in_fresh_namespace(kind: str, ns: str) -> None:
    backend = make_backend(kind, ns)
    before = snapshot(kind, ns, drop_empty_builtins=True)
    assert not backend.installed("lab")

    prepared = backend.prepare(INSTALL)
    # iptables-nft creates the shared ip nat/filter tables; prepare records that so that the
    # removal can drop them again (legacy tables and our nft table need no such record).
    expected_fresh = ("nat", "filter") if kind == "iptables" else ()
    assert prepared == dataclasses.replace(INSTALL, fresh_tables=expected_fresh)
    assert backend.apply(prepared) is None
    assert backend.installed("lab")
    if kind == "nftables":
        objects = nft_objects(ns)
        assert [o["table"] for o in objects if "table" in o] == [
            {"family": "inet", "name": "wsnic_lab"}]
        assert [o["chain"] for o in objects if "chain" in o] == [
            {"family": "inet", "table": "wsnic_lab", "name": "forward", "type": "filter",
             "hook": "forward", "prio": 0, "policy": "accept"},
            {"family": "inet", "table": "wsnic_lab", "name": "postrouting", "type": "nat",
             "hook": "postrouting", "prio": 100, "policy": "accept"},
        ]
        assert sh(["nft", "list", "table", "inet", "wsnic_lab"], netns=ns).stdout == \
            EXPECTED_NFT_TABLE
    else:
        ours = normalise_save(ipt_save(ns, kind), drop_empty_builtins=True)
        assert ours == EXPECTED_IPT
    installed = snapshot(kind, ns)

    backend.apply(INSTALL)  # re-install: replaces, never duplicates
    assert snapshot(kind, ns) == installed

    backend.apply(prepared.inverse())
    assert not backend.installed("lab")
    assert snapshot(kind, ns, drop_empty_builtins=True) == before
    if kind == "iptables":  # nothing left at all, not even empty built-in tables
        assert sh(["nft", "list", "ruleset"], netns=ns).stdout == ""
    assert "wsnic" not in sh(["nft", "list", "ruleset"], netns=ns).stdout.lower()
    if kind != "nftables":
        assert "WSNIC" not in ipt_save(ns, kind)
    backend.apply(REMOVE)  # already gone: success
    assert backend.sweep("lab") == []


@pytest.mark.parametrize("kind", KINDS)
def test_reinstall_with_a_changed_ruleset_replaces_it(kind: str, ns: str) -> None:
    backend = make_backend(kind, ns)
    backend.apply(INSTALL)
    smaller = InstallFirewall("lab", "wsnic:lab", Ruleset(isolated=(IsolatedNetwork("wsbr9"),)))
    backend.apply(smaller)
    text = sh(["nft", "list", "ruleset"], netns=ns).stdout
    if kind != "nftables":
        text += ipt_save(ns, kind)
    assert "wsbr9" in text
    assert "wsbr0" not in text and "wsbr1" not in text and "masquerade" not in text.lower()
    assert backend.installed("lab")
    assert backend.sweep("lab") != []
    assert not backend.installed("lab")


@pytest.mark.parametrize("kind", KINDS)
def test_commands_are_exact(kind: str) -> None:
    """What `commands()` shows, run by the plain tool in another namespace, gives the very same
    ruleset as the backend's own apply."""
    with netns("fwa") as applied, netns("fwb") as typed:
        backend = make_backend(kind, applied)
        backend.apply(INSTALL)
        lines = make_backend(kind, typed).commands(INSTALL)
        if kind == "nftables":
            assert lines[0] == "add table inet wsnic_lab"
            sh(["nft", "-f", "-"], netns=typed, input_text="\n".join(lines) + "\n")
        else:
            assert lines[0] == f"ip netns exec {typed} {kind}-restore --noflush -w"
            sh([f"{kind}-restore", "--noflush", "-w"], netns=typed,
               input_text="\n".join(lines[1:]) + "\n")
        assert snapshot(kind, typed) == snapshot(kind, applied)

        removal = make_backend(kind, applied).commands(REMOVE)
        if kind == "nftables":
            assert removal == ["delete table inet wsnic_lab"]
            sh(["nft", "-f", "-"], netns=typed, input_text="\n".join(removal) + "\n")
        else:
            sh([f"{kind}-restore", "--noflush", "-w"], netns=typed,
               input_text="\n".join(removal[1:]) + "\n")
        backend.apply(REMOVE)
        assert snapshot(kind, typed) == snapshot(kind, applied)


def _add_foreign_objects(kind: str, ns: str) -> None:
    sh(["nft", "-f", "-"], netns=ns, input_text=(
        "table inet foreign {\n"
        "  chain filter_fwd { type filter hook forward priority 0; policy accept;\n"
        '    iifname "lo" accept comment "not ours"\n'
        "  }\n"
        "}\n"
        "table inet wsnic_labx {\n"  # a look-alike name: must not be mistaken for ours
        "  chain c { }\n"
        "}\n"))
    if kind != "nftables":
        ipt = kind
        sh([ipt, "-A", "FORWARD", "-i", "lo", "-j", "ACCEPT"], netns=ns)
        sh([ipt, "-A", "FORWARD", "-m", "comment", "--comment", "wsnic:labx", "-j", "RETURN"],
           netns=ns)
        sh([ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "lo", "-j", "RETURN"], netns=ns)
        sh([ipt, "-N", "WSNIC-labx-FWD"], netns=ns)
        sh([ipt, "-A", "WSNIC-labx-FWD", "-j", "RETURN"], netns=ns)


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_objects_survive(kind: str, ns: str) -> None:
    _add_foreign_objects(kind, ns)
    backend = make_backend(kind, ns)
    other = InstallFirewall("other", "wsnic:other",
                            Ruleset(nat=(NatNetwork("wsbr7", "10.77.0.0/24", "up7"),)))
    backend.apply(other)
    before = snapshot(kind, ns)
    before_text = sh(["nft", "list", "ruleset"], netns=ns).stdout

    backend.apply(INSTALL)
    during = sh(["nft", "list", "ruleset"], netns=ns).stdout
    if kind != "nftables":
        during += ipt_save(ns, kind)
    assert "table inet foreign" in during and "wsnic_labx" in during and "wsbr7" in during
    backend.apply(INSTALL)
    backend.apply(REMOVE)
    backend.apply(REMOVE)

    assert sh(["nft", "list", "ruleset"], netns=ns).stdout == before_text  # byte for byte
    assert snapshot(kind, ns) == before
    assert backend.installed("other")
    backend.apply(other.inverse())
    assert not backend.installed("other")


@pytest.mark.parametrize("kind", ["iptables", "iptables-legacy"])
def test_iptables_refuses_to_remove_a_chain_a_foreign_rule_uses(kind: str, ns: str) -> None:
    backend = make_backend(kind, ns)
    backend.apply(INSTALL)
    sh([kind, "-A", "INPUT", "-j", "WSNIC-lab-FWD"], netns=ns)  # untagged: not ours to delete
    before = ipt_save(ns, kind)
    with pytest.raises(BackendError, match=r"WSNIC-lab-FWD.*does not own"):
        backend.apply(REMOVE)
    assert normalise_save(ipt_save(ns, kind)) == normalise_save(before)
    sh([kind, "-D", "INPUT", "-j", "WSNIC-lab-FWD"], netns=ns)
    backend.apply(REMOVE)
    assert not backend.installed("lab")


class _BrokenFilterSection(IptablesFirewallBackend):
    """Injects a line iptables-restore rejects into the filter section (the second one), after
    the nat section has been committed: the failure mode a document cannot make atomic."""

    def _install_document(self, *args: Any, **kwargs: Any) -> list[str]:
        lines = super()._install_document(*args, **kwargs)
        return [*lines[:-1], "-A WSNIC-lab-FWD --no-such-option", "COMMIT"]


@pytest.mark.parametrize("kind", ["iptables", "iptables-legacy"])
def test_iptables_failed_install_leaves_nothing_behind(kind: str, ns: str) -> None:
    make_backend(kind, ns)  # skips when the binary is missing
    backend = _BrokenFilterSection(ns, binary=kind)
    backend_ok = IptablesFirewallBackend(ns, binary=kind)
    before = normalise_save(ipt_save(ns, kind), drop_empty_builtins=True)
    with pytest.raises(BackendError, match=r"no-such-option|line"):
        backend.apply(INSTALL)
    assert normalise_save(ipt_save(ns, kind), drop_empty_builtins=True) == before
    assert not backend_ok.installed("lab")


def test_nftables_failed_install_is_atomic(ns: str) -> None:
    backend = make_backend("nftables", ns)
    # Our table with a chain of the wrong hook: `add chain` must fail, and the whole batch
    # (flush included) must be rolled back by the kernel.
    sh(["nft", "-f", "-"], netns=ns, input_text=(
        "table inet wsnic_lab {\n"
        "  chain forward { type filter hook input priority 0; policy accept;\n"
        '    iifname "lo" accept\n'
        "  }\n"
        "}\n"))
    before = sh(["nft", "list", "ruleset"], netns=ns).stdout
    with pytest.raises(BackendError, match=r"nftables: install table inet wsnic_lab in netns"):
        backend.apply(INSTALL)
    assert sh(["nft", "list", "ruleset"], netns=ns).stdout == before
    assert not backend.installed("lab")
    assert backend.sweep("lab") == ["nftables table inet wsnic_lab"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "step",
    [
        InstallFirewall("lab", "wsnic:lab", Ruleset(isolated=(IsolatedNetwork("bad name"),))),
        InstallFirewall("lab", "wsnic:lab",
                        Ruleset(nat=(NatNetwork("wsbr0", "10.0.0.1/24", "eth0"),))),
        InstallFirewall("lab", "wsnic:other", RULESET),
        InstallFirewall("Lab;", "wsnic:Lab;", RULESET),
    ],
    ids=["bad-ifname", "host-bits", "owner-mismatch", "bad-instance"],
)
def test_invalid_steps_are_refused_before_touching_anything(
    kind: str, step: InstallFirewall, ns: str
) -> None:
    backend = make_backend(kind, ns)
    before = snapshot(kind, ns)
    with pytest.raises(BackendError, match="firewall"):
        backend.apply(step)
    with pytest.raises(BackendError, match="firewall"):
        backend.commands(step)
    assert snapshot(kind, ns) == before


@pytest.mark.parametrize("kind", KINDS)
def test_reachability(kind: str) -> None:
    probe: Callable[..., str | None] = topo.tcp_probe
    with topo.firewall_topology() as t, topo.peer_reporters(
        t.upstream, t.nat_guest, t.iso_peer, t.router
    ):
        backend = make_backend(kind, t.router)
        step = InstallFirewall("lab", "wsnic:lab", t.ruleset())

        # Without the ruleset everything is routed, un-NATed: each assertion below can fail.
        assert probe(t.nat_guest, topo.UPSTREAM_IP) == topo.NAT_GUEST_IP
        assert probe(t.upstream, topo.NAT_GUEST_IP) == topo.UPSTREAM_IP
        assert probe(t.iso_guest, topo.UPSTREAM_IP) == topo.ISO_GUEST_IP
        assert probe(t.iso_guest, topo.NAT_GUEST_IP) == topo.ISO_GUEST_IP

        backend.apply(step)
        # NAT network: out masqueraded behind the uplink address; no new inbound connections.
        assert probe(t.nat_guest, topo.UPSTREAM_IP) == topo.ROUTER_UPLINK_IP
        assert probe(t.upstream, topo.NAT_GUEST_IP, timeout=1.0) is None
        assert probe(t.nat_guest, topo.ISO_PEER_IP, timeout=1.0) is None
        # Isolated network: nothing forwarded in or out, but the bridge address and the other
        # guest on the same bridge (via br_netfilter's forward hook) still answer.
        assert probe(t.iso_guest, topo.UPSTREAM_IP, timeout=1.0) is None
        assert probe(t.iso_guest, topo.NAT_GUEST_IP, timeout=1.0) is None
        assert probe(t.upstream, topo.ISO_PEER_IP, timeout=1.0) is None
        assert probe(t.iso_guest, topo.ISO_GATEWAY) == topo.ISO_GUEST_IP
        assert probe(t.iso_guest, topo.ISO_PEER_IP) == topo.ISO_GUEST_IP

        backend.apply(step.inverse())
        assert probe(t.nat_guest, topo.UPSTREAM_IP) == topo.NAT_GUEST_IP
        assert probe(t.iso_guest, topo.UPSTREAM_IP) == topo.ISO_GUEST_IP


def test_a_shared_table_someone_else_filled_meanwhile_is_kept(ns: str) -> None:
    """iptables-nft's ip filter table appeared with our install; a native nft chain another tool
    added to it since must survive our removal (iptables-save would not even show it)."""
    backend = make_backend("iptables", ns)
    prepared = backend.prepare(INSTALL)
    assert "filter" in getattr(prepared, "fresh_tables", ())
    backend.apply(prepared)
    sh(["nft", "add", "chain", "ip", "filter", "audit"], netns=ns)
    sh(["nft", "add", "rule", "ip", "filter", "audit", "counter"], netns=ns)
    backend.apply(prepared.inverse())
    assert "chain audit" in sh(["nft", "list", "table", "ip", "filter"], netns=ns).stdout
    assert "WSNIC" not in ipt_save(ns, "iptables")
