"""Ethernet frame checks and the server's WebSocket data-frame header, pure functions.

The relay forwards frames unmodified; it only refuses what no NIC would accept: runts shorter than
an ethernet header, frames larger than the configured maximum, and frames whose source address is
not a valid unicast station address (the Linux bridge would discard those anyway, so dropping them
here keeps the count visible).
"""

from __future__ import annotations

import struct
from enum import StrEnum

ETH_HEADER_LEN = 14  # destination MAC, source MAC, ethertype
ETH_ALEN = 6
ZERO_MAC = b"\x00" * ETH_ALEN

# FIN + opcode 2 (binary); the server never masks (RFC 6455 section 5.1).
_FIN_BINARY = 0x82
_HEADER_SHORT = [bytes((_FIN_BINARY, n)) for n in range(126)]
_pack_medium = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


class Drop(StrEnum):
    """Why a frame or message did not reach its destination."""

    TEXT = "text"  # a text message: the protocol carries frames in binary messages only
    RUNT = "runt"  # shorter than an ethernet header
    OVERSIZED = "oversized"  # larger than server.max_frame_size
    BAD_SOURCE = "bad_source"  # source MAC multicast/broadcast or all zero
    TAP_FULL = "tap_full"  # the TAP could not take the write (EAGAIN/ENOBUFS/EIO)
    CLIENT_SLOW = "client_slow"  # the client's send buffer was over its bound
    POLICED = "policed"  # over its fair share towards a destination that backs up


def check_frame(frame: bytes | bytearray | memoryview, max_size: int) -> Drop | None:
    """The reason to drop a frame received from a client, or None when it may go to the TAP."""
    size = len(frame)
    if size < ETH_HEADER_LEN:
        return Drop.RUNT
    if size > max_size:
        return Drop.OVERSIZED
    # Bit 0 of the first source octet is the group bit; a station never sends from a group address.
    if frame[ETH_ALEN] & 1 or frame[ETH_ALEN : 2 * ETH_ALEN] == ZERO_MAC:
        return Drop.BAD_SOURCE
    return None


def ws_binary_header(length: int) -> bytes:
    """The header of an unmasked, final binary WebSocket frame carrying `length` bytes."""
    if length < 126:
        return _HEADER_SHORT[length]
    if length < 65536:
        return _pack_medium(_FIN_BINARY, 126, length)
    return _pack_long(_FIN_BINARY, 127, length)


def mac_str(mac: bytes | bytearray | memoryview) -> str:
    """aa:bb:cc:dd:ee:ff for six raw bytes."""
    return ":".join(f"{b:02x}" for b in bytes(mac))


def source_mac(frame: bytes | bytearray | memoryview) -> str:
    """The source MAC of a frame of at least 12 bytes, for logs."""
    return mac_str(frame[ETH_ALEN : 2 * ETH_ALEN])


def split_client_frames(buf: bytes, limit: int) -> tuple[list[tuple[int, int, int]], int, bool]:
    """Find the complete client frames at the front of `buf`.

    Returns (frames, consumed, passthrough). Each frame is (start, end, payload_start): the
    relay unmasks a final binary frame of at most `limit` bytes itself (the one message kind
    on the hot path) and hands any other complete frame, whole, to the websockets protocol,
    which is then again at a frame boundary. `consumed` bytes are covered; the rest is a partial
    frame. `passthrough` is True when a frame cannot be cut here (a 64-bit length, or no mask):
    it and everything after it go to the protocol, which refuses them."""
    frames: list[tuple[int, int, int]] = []
    i, n = 0, len(buf)
    while i + 2 <= n:
        b1 = buf[i + 1]
        length = b1 & 0x7F
        if not b1 & 0x80 or length == 127:
            return frames, i, True
        head = i + 6
        if length == 126:
            if i + 4 > n:
                break
            length = int.from_bytes(buf[i + 2 : i + 4], "big")
            head = i + 8
        end = head + length
        if end > n:
            break
        frames.append((i, end, head))
        i = end
    return frames, i, False


def is_fast_binary(buf: bytes, start: int, end: int, head: int, limit: int) -> bool:
    """A final binary frame small enough for the relay's own path."""
    return buf[start] == _FIN_BINARY and end - head <= limit
