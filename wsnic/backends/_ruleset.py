"""The firewall ruleset of an instance as backend-neutral rules (pure, no I/O).

Both firewall backends render the same list of `Rule`s, so the two can never disagree on meaning.
For each isolated bridge (first, so its drops win):

    forward:     iif BRIDGE, oif != BRIDGE -> drop
                 oif BRIDGE, iif != BRIDGE -> drop

Traffic within a bridge (iif == oif == BRIDGE) reaches the forward hook only when br_netfilter is
active, and must pass. Then for each NAT network:

    forward:     iif UPLINK, oif BRIDGE, ct state established,related -> accept
                 iif UPLINK, oif BRIDGE -> drop          (inbound only for established traffic)
                 iif BRIDGE, oif UPLINK, daddr SUBNET -> drop
                 iif BRIDGE, oif UPLINK -> accept
    postrouting: saddr SUBNET, oif UPLINK -> masquerade

The explicit inbound drop makes "inbound only for established traffic" hold on a host whose forward
policy is accept; the original wsnic relied on the host's FORWARD policy for it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from wsnic import tags
from wsnic.errors import BackendError
from wsnic.plan.steps import Ruleset

Chain = Literal["forward", "postrouting"]
Verdict = Literal["accept", "drop", "masquerade"]

# The same limits as the profile's IfName and instance name; checked again here because a step
# may come from a journal file, and these strings end up inside rule documents.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,14}$")


@dataclass(frozen=True)
class Rule:
    chain: Chain
    verdict: Verdict
    iif: str | None = None
    iif_negated: bool = False
    oif: str | None = None
    oif_negated: bool = False
    saddr: ipaddress.IPv4Network | None = None
    daddr: ipaddress.IPv4Network | None = None
    established: bool = False  # ct state established,related


def owner_tag(instance: str) -> str:
    """The tag every firewall object of `instance` carries (comment, owner)."""
    return tags.owner_tag(check_instance(instance))


def check_instance(instance: str) -> str:
    if not _INSTANCE_RE.match(instance):
        raise BackendError(
            f"firewall: {instance!r} is not a valid instance name (1 to 15 of a-z 0-9 _ -)"
        )
    return instance


def check_owner(instance: str, owner: str) -> str:
    """The step's owner must be the instance's tag: cleanup finds our objects by it."""
    tag = owner_tag(instance)
    if owner != tag:
        raise BackendError(f"firewall {instance}: owner {owner!r} must be {tag!r}")
    return tag


def _ifname(value: str, what: str) -> str:
    if not _IFNAME_RE.match(value) or value in (".", ".."):
        raise BackendError(f"firewall: {what} {value!r} is not a valid interface name")
    return value


def _subnet(value: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise BackendError(f"firewall: subnet {value!r} is not an IPv4 network: {exc}") from None


def rules_for(ruleset: Ruleset) -> list[Rule]:
    """The rules of `ruleset` in order: isolation drops first, then NAT (validated)."""
    rules: list[Rule] = []
    for iso in ruleset.isolated:
        br = _ifname(iso.bridge, "bridge")
        rules.append(Rule("forward", "drop", iif=br, oif=br, oif_negated=True))
        rules.append(Rule("forward", "drop", iif=br, iif_negated=True, oif=br))
    for nat in ruleset.nat:
        br = _ifname(nat.bridge, "bridge")
        up = _ifname(nat.uplink, "uplink")
        net = _subnet(nat.subnet)
        rules.append(Rule("forward", "accept", iif=up, oif=br, established=True))
        rules.append(Rule("forward", "drop", iif=up, oif=br))
        rules.append(Rule("forward", "drop", iif=br, oif=up, daddr=net))
        rules.append(Rule("forward", "accept", iif=br, oif=up))
    for nat in ruleset.nat:
        rules.append(
            Rule("postrouting", "masquerade", saddr=_subnet(nat.subnet),
                 oif=_ifname(nat.uplink, "uplink"))
        )
    return rules
