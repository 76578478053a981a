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


def _masked(payload: bytes, opcode: int, fin: bool, mask: bytes) -> bytes:
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    head = bytes([first, 0x80 | n]) if n < 126 else bytes([first, 0xFE]) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def test_split_client_frames_cuts_complete_frames_at_every_boundary() -> None:
    from wsnic.relay.frames import is_fast_binary, split_client_frames

    small, big = bytes(range(60)), bytes(1514)
    stream = (_masked(small, 0x2, True, b"abcd") + _masked(b"ping", 0x9, True, b"wxyz")
              + _masked(big, 0x2, True, b"\x00\xff\x00\xff"))
    ends = [len(_masked(small, 0x2, True, b"abcd")),
            len(_masked(small, 0x2, True, b"abcd")) + len(_masked(b"ping", 0x9, True, b"wxyz")),
            len(stream)]
    for cut in range(len(stream) + 1):
        frames, used, passthrough = split_client_frames(stream[:cut], 4 * 16384)
        assert not passthrough
        assert used == max([0] + [e for e in ends if e <= cut])
        assert [end for _, end, _ in frames] == [e for e in ends if e <= cut]
    frames, _, _ = split_client_frames(stream, 4 * 16384)
    kinds = [is_fast_binary(stream, s, e, h, 4 * 16384) for s, e, h in frames]
    assert kinds == [True, False, True]  # the ping goes to the protocol


def test_split_client_frames_passes_through_what_it_cannot_cut() -> None:
    from wsnic.relay.frames import split_client_frames

    ok = _masked(bytes(20), 0x2, True, b"abcd")
    unmasked = bytes([0x82, 20]) + bytes(20)
    frames, used, passthrough = split_client_frames(ok + unmasked, 65536)
    assert passthrough and used == len(ok) and len(frames) == 1
    huge = bytes([0x82, 0xFF]) + (70000).to_bytes(8, "big")
    assert split_client_frames(huge, 65536)[2]
    # a fragment start is complete but not on the fast path
    frag = _masked(bytes(30), 0x2, False, b"abcd")
    from wsnic.relay.frames import is_fast_binary

    [(s, e, h)] = split_client_frames(frag, 65536)[0]
    assert not is_fast_binary(frag, s, e, h, 65536)
