"""Open a TAP device: TUNSETIFF on /dev/net/tun, non-blocking, not persistent.

The device lives exactly as long as its file descriptor: closing the fd removes it from the
kernel, so a client's TAP can never outlive the client, even when wsnic is killed.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from wsnic.errors import BackendError
from wsnic.relay.frames import mac_str

TUN_CLONE_DEVICE = "/dev/net/tun"
# From linux/if_tun.h and linux/sockios.h.
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000  # no 4-byte packet-information prefix: reads and writes are bare frames
SIOCGIFHWADDR = 0x8927
IFNAMSIZ = 16
_IFREQ_SIZE = 40  # struct ifreq on 64-bit Linux


def _hwaddr(ifname: str) -> str:
    """The MAC of `ifname` in the calling thread's network namespace."""
    ifreq = struct.pack(f"{IFNAMSIZ}s{_IFREQ_SIZE - IFNAMSIZ}s", ifname.encode(), b"")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        answer = fcntl.ioctl(sock.fileno(), SIOCGIFHWADDR, ifreq)
    # ifr_hwaddr is a sockaddr: 2 bytes of family, then the address.
    return mac_str(answer[IFNAMSIZ + 2 : IFNAMSIZ + 8])


def open_tap(name: str) -> tuple[int, str, str]:
    """Create a TAP named `name` (a pattern with %d lets the kernel pick the index).

    Returns (fd, actual name, MAC). The fd is non-blocking and close-on-exec, so children such
    as dnsmasq never inherit a TAP and keep it alive. The device is created in the network
    namespace of the calling thread.
    """
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ:
        raise BackendError(f"TAP name {name!r} must have 1 to {IFNAMSIZ - 1} characters")
    try:
        fd = os.open(TUN_CLONE_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(
            f"cannot open {TUN_CLONE_DEVICE} for TAP {name!r}: {exc.strerror} "
            "(needs root or CAP_NET_ADMIN and the tun module)"
        ) from exc
    try:
        ifreq = struct.pack(f"{IFNAMSIZ}sH", encoded, IFF_TAP | IFF_NO_PI)
        answer = fcntl.ioctl(fd, TUNSETIFF, ifreq)
        actual = answer[:IFNAMSIZ].rstrip(b"\0").decode()
        return fd, actual, _hwaddr(actual)
    except OSError as exc:
        os.close(fd)
        raise BackendError(f"TUNSETIFF for TAP {name!r} failed: {exc.strerror}") from exc
    except BaseException:
        os.close(fd)
        raise
