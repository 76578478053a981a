"""Run a Python callable inside a named network namespace without moving the whole process.

setns(2) with CLONE_NEWNET changes the namespace of the calling *thread* only, so the callable
runs on a short-lived thread that enters the namespace first. Sockets (netlink, libnftables) and
/proc/sys/net files opened on that thread belong to that namespace.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from wsnic.errors import BackendError

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def enter_netns(netns: str) -> None:
    """Move the calling thread into `netns` (a name under /run/netns)."""
    path = os.path.join(NETNS_DIR, netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BackendError(f"network namespace {netns!r} does not exist ({path})") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise BackendError(f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Return fn() evaluated inside `netns` (None: right here, in the current namespace)."""
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def runner() -> None:
        try:
            enter_netns(netns)
            result.append(fn())
        except BaseException as exc:  # handed back to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=runner, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
