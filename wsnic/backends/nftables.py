"""Firewall backend on nftables through libnftables' JSON API (the pip-nftables bindings).

An instance owns one table, `inet wsnic_<instance>`, with a `forward` chain (filter, priority 0,
policy accept) and a `postrouting` chain (nat, priority 100). Every change is one JSON batch,
which libnftables sends as one kernel transaction: it applies completely or not at all. No other
table is ever read for writing, flushed or deleted.

Ownership is the table's name. Every rule also carries the comment `wsnic:<instance>`; the table
itself carries none, because libnftables 1.0.6 silently ignores a table "comment" given in JSON
(checked: the table is created without it).

When `netns` is set, each call runs on a thread that entered that namespace (call_in_netns) and
opens its own libnftables context there, so the netlink socket belongs to the namespace.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import nftables

from wsnic.backends._netns import call_in_netns
from wsnic.backends._ruleset import Rule, check_instance, check_owner, rules_for
from wsnic.errors import BackendError
from wsnic.plan.steps import InstallFirewall, RemoveFirewall, Step

FAMILY = "inet"
FORWARD_CHAIN = "forward"
POSTROUTING_CHAIN = "postrouting"

Json = dict[str, Any]


def nftables_available() -> bool:
    """True when the bindings can load the system's libnftables."""
    try:
        nftables.Nftables()
    except OSError:
        return False
    return True


def table_name(instance: str) -> str:
    return f"wsnic_{check_instance(instance)}"


# --- rendering: every piece as (JSON expression, nft text) so the two cannot drift ---------------


def _iface(key: str, name: str, negated: bool) -> tuple[Json, str]:
    op = "!=" if negated else "=="
    text = f'{key} != "{name}"' if negated else f'{key} "{name}"'
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": name}}, text


def _address(field: str, rule_net: ipaddress.IPv4Network) -> tuple[Json, str]:
    prefix = {"prefix": {"addr": str(rule_net.network_address), "len": rule_net.prefixlen}}
    match = {"op": "==", "left": {"payload": {"protocol": "ip", "field": field}}, "right": prefix}
    return {"match": match}, f"ip {field} {rule_net}"


def _rule_parts(rule: Rule) -> list[tuple[Json, str]]:
    parts: list[tuple[Json, str]] = []
    if rule.iif is not None:
        parts.append(_iface("iifname", rule.iif, rule.iif_negated))
    if rule.oif is not None:
        parts.append(_iface("oifname", rule.oif, rule.oif_negated))
    if rule.saddr is not None:
        parts.append(_address("saddr", rule.saddr))
    if rule.daddr is not None:
        parts.append(_address("daddr", rule.daddr))
    if rule.established:
        ct = {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}
        parts.append(({"match": ct}, "ct state established,related"))
    parts.append(({rule.verdict: None}, rule.verdict))
    return parts


def _chains(table: str) -> list[tuple[Json, str]]:
    out = []
    for name, kind, prio in ((FORWARD_CHAIN, "filter", 0), (POSTROUTING_CHAIN, "nat", 100)):
        chain = {"family": FAMILY, "table": table, "name": name, "type": kind, "hook": name,
                 "prio": prio, "policy": "accept"}
        text = (f"add chain {FAMILY} {table} {name} "
                f"{{ type {kind} hook {name} priority {prio}; policy accept; }}")
        out.append(({"add": {"chain": chain}}, text))
    return out


def install_batch(instance: str, owner: str, rules: list[Rule]) -> list[tuple[Json, str]]:
    """The install transaction, command by command, as (JSON command, nft text)."""
    tag = check_owner(instance, owner)
    table = table_name(instance)
    ref = {"family": FAMILY, "name": table}
    # add + flush: creates the table or empties the existing one, so re-installing replaces.
    batch: list[tuple[Json, str]] = [
        ({"add": {"table": dict(ref)}}, f"add table {FAMILY} {table}"),
        ({"flush": {"table": dict(ref)}}, f"flush table {FAMILY} {table}"),
        *_chains(table),
    ]
    for rule in rules:
        parts = _rule_parts(rule)
        body = {"family": FAMILY, "table": table, "chain": rule.chain, "comment": tag,
                "expr": [p[0] for p in parts]}
        text = " ".join(p[1] for p in parts)
        batch.append(({"add": {"rule": body}},
                      f'add rule {FAMILY} {table} {rule.chain} {text} comment "{tag}"'))
    return batch


def remove_batch(instance: str) -> list[tuple[Json, str]]:
    table = table_name(instance)
    return [({"delete": {"table": {"family": FAMILY, "name": table}}},
             f"delete table {FAMILY} {table}")]


class NftablesFirewallBackend:
    """InstallFirewall / RemoveFirewall as single libnftables JSON transactions."""

    name = "nftables"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    # --- Backend protocol ------------------------------------------------------------------

    def commands(self, step: Step) -> list[str]:
        """The transaction as nft text (what `nft -f` would take for the same batch). Remove
        runs only when the table exists."""
        return [text for _, text in self._batch(step)]

    def prepare(self, step: Step) -> Step:
        return step

    def apply(self, step: Step) -> Step | None:
        if isinstance(step, InstallFirewall):
            batch = [cmd for cmd, _ in self._batch(step)]
            self._run(batch, f"install table {FAMILY} {table_name(step.instance)}")
        elif isinstance(step, RemoveFirewall):
            self._remove(step.instance)
        else:
            raise BackendError(f"nftables backend cannot run {type(step).__name__}")
        return None

    # --- FirewallBackend -------------------------------------------------------------------

    def installed(self, instance: str) -> bool:
        """Our table exists with both its chains."""
        table = table_name(instance)
        if not self._table_exists(table):
            return False
        listing = self._run([{"list": {"table": {"family": FAMILY, "name": table}}}],
                            f"list table {table}")
        chains = {obj["chain"]["name"] for obj in listing if "chain" in obj}
        return {FORWARD_CHAIN, POSTROUTING_CHAIN} <= chains

    def sweep(self, instance: str) -> list[str]:
        return self._remove(instance)

    # --- internals -------------------------------------------------------------------------

    def _batch(self, step: Step) -> list[tuple[Json, str]]:
        if isinstance(step, InstallFirewall):
            return install_batch(step.instance, step.owner, rules_for(step.ruleset))
        if isinstance(step, RemoveFirewall):
            return remove_batch(step.instance)
        raise BackendError(f"nftables backend cannot run {type(step).__name__}")

    def _where(self) -> str:
        return "" if self.netns is None else f" in netns {self.netns}"

    def _run(self, commands: list[Json], what: str) -> list[Json]:
        """One libnftables call (one transaction); the JSON objects it printed."""

        def call() -> tuple[int, Any, str]:
            ctx = nftables.Nftables()  # opened on this thread: inside self.netns
            rc, output, error = ctx.json_cmd({"nftables": commands})
            return int(rc), output, str(error)

        try:
            rc, output, error = call_in_netns(self.netns, call)
        except OSError as exc:
            raise BackendError(f"nftables: cannot load libnftables: {exc}") from exc
        if rc != 0:
            detail = " ".join(error.split()) or f"return code {rc}"
            raise BackendError(f"nftables: {what}{self._where()} failed: {detail}")
        if isinstance(output, dict):
            return [obj for obj in output.get("nftables", []) if isinstance(obj, dict)]
        return []

    def _table_exists(self, table: str) -> bool:
        listing = self._run([{"list": {"tables": None}}], "list tables")
        return any(
            obj["table"].get("family") == FAMILY and obj["table"].get("name") == table
            for obj in listing if "table" in obj
        )

    def _remove(self, instance: str) -> list[str]:
        table = table_name(instance)
        if not self._table_exists(table):
            return []  # already gone: success
        try:
            self._run([cmd for cmd, _ in remove_batch(instance)], f"delete table {table}")
        except BackendError:
            if self._table_exists(table):
                raise
            return []  # removed concurrently: still success
        return [f"nftables table {FAMILY} {table}"]

