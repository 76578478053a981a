"""Ethernet frame checks and the server's WebSocket header."""

import struct

import pytest
from websockets.frames import Frame, Opcode

from wsnic.relay.frames import Drop, check_frame, mac_str, source_mac, ws_binary_header

SRC = bytes.fromhex("020000000001")
DST = b"\xff" * 6


def eth(size: int, src: bytes = SRC) -> bytes:
    assert size >= 14
    return DST + src + b"\x08\x06" + bytes(size - 14)


def test_minimum_frame_passes():
    assert check_frame(eth(14), 1514) is None


@pytest.mark.parametrize("size", [0, 1, 13])
def test_runts(size):
    assert check_frame(eth(14)[:size], 1514) is Drop.RUNT


def test_oversized_boundary():
    assert check_frame(eth(1514), 1514) is None
    assert check_frame(eth(1515), 1514) is Drop.OVERSIZED


@pytest.mark.parametrize("src", [b"\x01\x00\x5e\x00\x00\x01", b"\xff" * 6, b"\x00" * 6,
                                 b"\x03\x00\x00\x00\x00\x00"])
def test_group_or_zero_source_is_dropped(src):
    assert check_frame(eth(60, src), 1514) is Drop.BAD_SOURCE


def test_multicast_destination_is_fine():
    frame = b"\x01\x00\x5e\x00\x00\x01" + SRC + b"\x08\x00" + bytes(46)
    assert check_frame(frame, 1514) is None


def test_memoryview_and_bytearray_accepted():
    assert check_frame(memoryview(eth(60)), 1514) is None
    assert check_frame(bytearray(eth(60)), 1514) is None


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 1514, 65535, 65536, 70000])
def test_header_matches_websockets_serialization(length):
    payload = bytes(length)
    expected = Frame(Opcode.BINARY, payload).serialize(mask=False)
    assert ws_binary_header(length) + payload == expected


def test_header_sizes():
    assert len(ws_binary_header(125)) == 2
    assert ws_binary_header(126) == struct.pack("!BBH", 0x82, 126, 126)
    assert len(ws_binary_header(1 << 16)) == 10


def test_mac_formatting():
    assert mac_str(b"\x02\x00\x00\xab\xcd\xef") == "02:00:00:ab:cd:ef"
    assert source_mac(eth(60)) == "02:00:00:00:00:01"
