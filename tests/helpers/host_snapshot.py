"""Everything wsnic may touch in a namespace, normalised so that two snapshots compare equal
exactly when the namespace was given back as it was found."""

from __future__ import annotations

import json
import re

from tests.helpers.netns import sh

SYSCTLS = ("net.ipv4.ip_forward",)


def _links(ns: str) -> list[dict[str, object]]:
    out = json.loads(sh(["ip", "-json", "-details", "link", "show"], netns=ns).stdout)
    keep = ("ifname", "address", "flags", "mtu", "master", "ifalias", "operstate")
    links = []
    for link in out:
        item: dict[str, object] = {k: link.get(k) for k in keep}
        item["kind"] = (link.get("linkinfo") or {}).get("info_kind")
        links.append(item)
    return sorted(links, key=lambda x: str(x["ifname"]))


def _addresses(ns: str) -> list[tuple[str, str]]:
    out = json.loads(sh(["ip", "-json", "addr", "show"], netns=ns).stdout)
    return sorted(
        (str(link["ifname"]), f"{a['local']}/{a['prefixlen']}")
        for link in out
        for a in link.get("addr_info", [])
    )


def _routes(ns: str) -> list[str]:
    lines = []
    for family in ("-4", "-6"):
        out = sh(["ip", family, "route", "show", "table", "all"], netns=ns).stdout
        lines += [line.strip() for line in out.splitlines() if line.strip()]
    return sorted(lines)


def normalise_iptables(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        lines.append(re.sub(r"\[\d+:\d+\]", "[0:0]", line))
    return lines


def _nft(ns: str) -> str:
    out = sh(["nft", "list", "ruleset"], netns=ns).stdout
    return re.sub(r"handle \d+", "", out)


def _processes(ns: str) -> list[str]:
    pids = sh(["ip", "netns", "pids", ns]).stdout.split()
    commands = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                commands.append(f.read().replace(b"\0", b" ").decode().strip())
        except FileNotFoundError:
            continue
    return sorted(commands)


def snapshot(ns: str) -> dict[str, object]:
    return {
        "links": _links(ns),
        "addresses": _addresses(ns),
        "routes": _routes(ns),
        "nft": _nft(ns),
        "iptables": normalise_iptables(sh(["iptables-save"], netns=ns).stdout),
        "iptables-legacy": normalise_iptables(
            sh(["iptables-legacy-save"], netns=ns, check=False).stdout
        ),
        "sysctls": {
            name: sh(["sysctl", "-n", name], netns=ns).stdout.strip() for name in SYSCTLS
        },
        "processes": _processes(ns),
    }
