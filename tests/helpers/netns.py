"""Throwaway network namespaces for tests: always named wsnt-*, always removed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence

PREFIX = "wsnt-"


def sh(argv: Sequence[str], netns: str | None = None, check: bool = True,
       input_text: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run argv (inside netns if given) and return the completed process."""
    full = list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(full, capture_output=True, text=True, check=check,
                          input=input_text, timeout=timeout)


def _pids_in(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def delete_netns(name: str) -> None:
    """Kill what still runs in the namespace (only processes inside it), then delete it."""
    for pid in _pids_in(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def netns(tag: str = "t") -> Iterator[str]:
    """A fresh namespace with loopback up; deleted afterwards even when the test fails."""
    name = f"{PREFIX}{tag[:6]}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        sh(["ip", "link", "set", "lo", "up"], netns=name)
        yield name
    finally:
        delete_netns(name)


def veth_between(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with one end in each namespace (created in ns_a, peer moved to ns_b)."""
    sh(["ip", "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b],
       netns=ns_a)


def settle(ns: str, timeout: float = 5.0) -> None:
    """Wait (bounded) until IPv6 duplicate address detection is over in `ns`: link-local
    addresses and their local routes appear a moment after a link goes up, and a snapshot
    taken before that would differ from one taken after for reasons of timing only."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sh(["ip", "-6", "addr", "show", "tentative"], netns=ns).stdout.strip():
            return
        time.sleep(0.1)
