"""What a namespace's links, addresses and routes look like, read with `ip -json` (for tests).

The link backends are checked against this independent reading, never against themselves.
"""

from __future__ import annotations

import json
from typing import Any

from tests.helpers.netns import sh

# Keys whose values differ between two namespaces holding the same objects, or drift with time.
_VOLATILE = {"ifindex", "link_index", "hello_timer", "tcn_timer", "topology_change_timer",
             "gc_timer"}


def ip_raw(ns: str, *args: str) -> str:
    """`ip -n NS -json ARGS…` exactly as printed."""
    return sh(["ip", "-n", ns, "-json", *args]).stdout


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(ip_raw(ns, *args))


def link(ns: str, name: str) -> dict[str, Any]:
    """`ip -d -json addr show dev NAME`: the link with its details and addresses."""
    return dict(ip_json(ns, "-d", "addr", "show", "dev", name)[0])


def link_names(ns: str) -> set[str]:
    return {item["ifname"] for item in ip_json(ns, "link", "show")}


def listing(ns: str) -> tuple[str, str]:
    """The byte-exact `ip -json link show` and `ip -json addr show` of a namespace."""
    return ip_raw(ns, "link", "show"), ip_raw(ns, "addr", "show")


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def normalised(ns: str) -> dict[str, Any]:
    """Links (with details), addresses and main-table routes, without ifindexes and timers,
    so that two namespaces holding the same objects compare equal."""
    return {
        "links": _strip(ip_json(ns, "-d", "link", "show")),
        "addrs": _strip(ip_json(ns, "addr", "show")),
        "routes": _strip(ip_json(ns, "route", "show", "table", "main")),
    }
