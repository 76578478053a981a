"""Sysctl names, shared by both link backends: which ones wsnic may touch and where they live.

Names use sysctl(8)'s dotted form. As in sysctl(8), a "/" inside a component stands for a literal
"." (an interface name such as eth0.100): net.ipv4.conf.eth0/100.forwarding.
"""

from __future__ import annotations

import re

from wsnic.errors import BackendError

# Components cannot be empty, "." or "..", so the /proc/sys path cannot escape net/.
_COMPONENT = r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*"
_NET_NAME_RE = re.compile(rf"^net(?:\.{_COMPONENT})+$")
PROC_SYS = "/proc/sys"


def check_net_sysctl(name: str) -> str:
    """Return `name` if it is a net.* sysctl name; wsnic never writes anything else."""
    if not _NET_NAME_RE.match(name):
        raise BackendError(
            f"sysctl {name!r}: refused, wsnic only reads and writes net.* sysctls "
            "(letters, digits, _ and - between dots)"
        )
    return name


def check_value(name: str, value: str) -> str:
    """Return `value` if it is one line (a sysctl write is one line, several would be garbage)."""
    if "\n" in value or "\r" in value or not value.strip():
        raise BackendError(f"sysctl {name}: refused value {value!r} (empty or several lines)")
    return value


def proc_path(name: str) -> str:
    """/proc/sys path of a checked net.* name (dots become slashes, slashes become dots)."""
    check_net_sysctl(name)
    parts = [part.replace("/", ".") for part in name.split(".")]
    return "/".join([PROC_SYS, *parts])


def clean(raw: str) -> str:
    """A sysctl's value as read: the file's text without its trailing newline."""
    return raw.rstrip("\n")
