"""The asyncio glue, bytes in and bytes out, without root.

The TAP is replaced by one end of an AF_UNIX SOCK_SEQPACKET pair: a real fd with the same
one-read-one-frame semantics, so the server code runs unchanged. The server listens on a free
loopback port. Real TAPs and bridges are exercised in tests/netns/test_relay.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from wsnic.config.models import Profile
from wsnic.errors import BackendError, ConfigError
from wsnic.relay.frames import Drop
from wsnic.relay.server import READ_BATCH, WRITE_HIGH, RelayServer
from wsnic.relay.settings import RelaySettings

FRAME = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(range(46))
REPLY = bytes.fromhex("020000000001") + bytes.fromhex("020000000002") + b"\x88\xb5" + b"r" * 46
KEY = base64.b64encode(b"0123456789abcdef").decode()
TIMEOUT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeTaps:
    """tap_opener for tests: the server gets one end of a seqpacket pair, tests the other."""

    def __init__(self) -> None:
        self.peers: dict[str, socket.socket] = {}
        self.n = 0

    def __call__(self, pattern: str) -> tuple[int, str, str]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        theirs.setblocking(False)
        name = pattern.replace("%d", str(self.n))
        self.n += 1
        self.peers[name] = theirs
        return ours.detach(), name, f"02:00:00:00:00:{self.n:02x}"

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close()


class Harness:
    def __init__(self, relay: RelayServer, taps: FakeTaps, attached: list[tuple[str, str]],
                 port: int) -> None:
        self.relay, self.taps, self.attached, self.port = relay, taps, attached, port
        self.url = f"ws://127.0.0.1:{port}"

    async def tap_recv(self, tap: str) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.taps.peers[tap], 65536), TIMEOUT)

    async def raw(self, path: str = "/") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(handshake(path))
        status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert status.startswith(b"HTTP/1.1 101"), status
        return reader, writer


def handshake(path: str = "/") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def masked(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


def run(test: Callable[[Harness], Awaitable[None]], *, fail_attach: bool = False,
        **server: Any) -> None:
    networks = server.pop("networks", None)
    port = free_port()
    data: dict[str, Any] = {"server": {"ws_port": port, "max_frame_size": 1514, **server}}
    if networks:
        data["networks"] = networks
    profile = Profile.model_validate(data)
    taps = FakeTaps()
    attached: list[tuple[str, str]] = []

    def attach(tap: str, bridge: str) -> None:
        if fail_attach:
            raise BackendError(f"ip link set dev {tap} master {bridge} up failed")
        attached.append((tap, bridge))

    async def main() -> None:
        relay = RelayServer(RelaySettings.from_profile(profile), attach, tap_opener=taps)
        await relay.start()
        try:
            await asyncio.wait_for(test(Harness(relay, taps, attached, port)), 30)
        finally:
            await relay.stop()

    try:
        asyncio.run(main())
    finally:
        taps.close()


def test_frames_flow_both_ways_unchanged():
    async def body(h: Harness) -> None:
        async with connect(h.url + "/any/path?q=1", compression=None) as ws:
            assert h.attached == [("wstap0", "wsbr0")]
            assert h.relay.client_count == 1
            await ws.send(FRAME)
            assert await h.tap_recv("wstap0") == FRAME
            h.taps.peers["wstap0"].send(REPLY)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == REPLY
        c = h.relay.counters
        assert (c.frames_in, c.bytes_in, c.frames_out, c.bytes_out) == (1, 60, 1, 60)

    run(body)


def test_bad_messages_are_dropped_and_counted_client_stays():
    async def body(h: Harness) -> None:
        async with connect(h.url, compression=None, max_size=None) as ws:
            await ws.send("a text message")
            await ws.send(FRAME[:10])  # runt
            await ws.send(FRAME + bytes(2000))  # oversized, below the hard limit
            await ws.send([FRAME[:7], FRAME[7:30], FRAME[30:]])  # fragmented: reassembled
            assert await h.tap_recv("wstap0") == FRAME
            await ws.send([bytes(1000), bytes(1000)])  # fragmented and oversized
            await ws.send(REPLY)
            assert await h.tap_recv("wstap0") == REPLY
            await asyncio.wait_for(ws.ping(), TIMEOUT)  # still connected
            drops = h.relay.counters.drops
            assert (drops[Drop.TEXT], drops[Drop.RUNT], drops[Drop.OVERSIZED]) == (1, 1, 2)
            # Above the hard limit the protocol refuses to buffer it: closed with 1009.
            await ws.send(bytes(4 * 1514 + 1))
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1009
        await asyncio.sleep(0.1)
        assert h.relay.counters.drops[Drop.OVERSIZED] == 3
        assert h.relay.client_count == 0

    run(body)


def test_frame_pipelined_with_the_handshake_is_delivered():
    async def body(h: Harness) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        raw = handshake() + masked(Opcode.BINARY, FRAME)
        writer.write(raw[:40])  # headers split across segments
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(raw[40:])
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert await h.tap_recv("wstap0") == FRAME
        writer.close()

    run(body)


async def http_answer(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), TIMEOUT)  # until the server closes
    writer.close()
    return data


def test_refusals_over_tcp_and_garbage():
    async def body(h: Harness) -> None:
        page = await http_answer(h.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 426 ") and b"TLS test succeeded" in page
        nf = await http_answer(h.port, handshake("/elsewhere"))
        assert nf.startswith(b"HTTP/1.1 404 ")
        assert await http_answer(h.port, b"\x16\x03\x01garbage\r\n\r\n") == b""
        async with connect(h.url + "/lab") as ws:
            assert h.attached == [("wstap0", "wsbr1")]
            full = await http_answer(h.port, handshake("/dev"))
            assert full.startswith(b"HTTP/1.1 503 ")
            await ws.send(FRAME)
            assert await h.tap_recv("wstap0") == FRAME
        stats = h.relay.stats
        assert stats["refused_426"] == 1 and stats["refused_404"] == 1
        assert stats["refused_503"] == 1 and stats["bad_requests"] == 1

    run(body, max_clients=1, networks=[
        {"name": "lab", "path": "/lab", "bridge": "wsbr1", "subnet": "10.1.0.0/24"},
        {"name": "dev", "path": "/dev", "bridge": "wsbr2", "subnet": "10.2.0.0/24"},
    ])


def test_failed_attach_answers_500_and_removes_the_tap():
    async def body(h: Harness) -> None:
        with pytest.raises(InvalidStatus) as info:
            async with connect(h.url):
                pass
        assert info.value.response.status_code == 500
        await asyncio.sleep(0.05)
        assert h.taps.peers["wstap0"].recv(10) == b""  # the server's end is closed
        assert h.relay.client_count == 0

    run(body, fail_attach=True)


def test_silent_client_is_pinged_then_dropped_while_a_live_one_stays():
    async def body(h: Harness) -> None:
        async with connect(h.url, ping_interval=None) as live:  # answers pings by itself
            reader, writer = await h.raw()
            # The silent client gets pings, never answers, and is closed (1001).
            data = await asyncio.wait_for(reader.read(), TIMEOUT)
            assert b"\x89\x05wsnic" in data  # an unmasked PING "wsnic"
            assert b"\x88" in data  # and a close frame
            writer.close()
            assert h.relay.client_count == 1
            await live.send(FRAME)
            assert await h.tap_recv("wstap0") == FRAME

    run(body, ping_interval=0.2, ping_timeout=0.6)


def test_client_that_never_reads_loses_frames_memory_stays_bounded():
    async def body(h: Harness) -> None:
        _, writer = await h.raw()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer = h.taps.peers["wstap0"]
        loop = asyncio.get_running_loop()
        frame = REPLY + bytes(1400)
        for _ in range(3000):
            await asyncio.wait_for(loop.sock_sendall(peer, frame), TIMEOUT)
        await asyncio.sleep(0.2)
        [conn] = h.relay.connections
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() <= WRITE_HIGH + READ_BATCH * 1500
        c = h.relay.counters
        assert c.drops[Drop.CLIENT_SLOW] > 0
        assert c.frames_out + c.drops[Drop.CLIENT_SLOW] == 3000
        writer.close()

    run(body)


def test_stop_closes_every_client_and_tap():
    async def body(h: Harness) -> None:
        clients = [await connect(h.url) for _ in range(3)]
        assert h.relay.client_count == 3
        await h.relay.stop()
        for name, peer in h.taps.peers.items():
            assert peer.recv(10) == b"", name
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
            with contextlib.suppress(Exception):
                await ws.close()
        assert h.relay.client_count == 0 and not h.relay.connections

    run(body)


def test_connect_and_leave_are_logged_with_forwarded_for(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="wsnic.relay")

    async def body(h: Harness) -> None:
        headers = {"X-Forwarded-For": "203.0.113.9, 10.0.0.1"}
        async with connect(h.url + "/p?token=secret", additional_headers=headers) as ws:
            await ws.send(FRAME)
            assert await h.tap_recv("wstap0") == FRAME
        await asyncio.sleep(0.1)

    run(body, trust_proxy=True)
    text = caplog.text
    assert re.search(r"203\.0\.113\.9 \(via 127\.0\.0\.1:\d+\) connected on /p: "
                     r"network default \(wsbr0\), wstap0 02:00:00:00:00:01", text), text
    assert re.search(r"203\.0\.113\.9 \(via 127\.0\.0\.1:\d+\) left after [\d.]+ s "
                     r"\(closed by client .*\); network default, wstap0 .*from client "
                     r"1 frames/60 B, to client 0 frames/0 B, dropped none", text), text
    assert "secret" not in text  # tokens in the query string are never logged


def test_unreadable_certificate_is_a_config_error_naming_the_file(tmp_path):
    cert = tmp_path / "missing.pem"
    profile = Profile.model_validate({"server": {
        "ws_port": free_port(), "wss_port": free_port(), "tls": {"certificate": str(cert)}}})

    async def main() -> None:
        relay = RelayServer(RelaySettings.from_profile(profile), lambda tap, bridge: None)
        with pytest.raises(ConfigError, match=r"missing\.pem"):
            await relay.start()
        assert relay.addresses == []

    asyncio.run(main())


def test_busy_port_is_a_backend_error_naming_the_address():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        profile = Profile.model_validate({"server": {"ws_port": port}})

        async def main() -> None:
            relay = RelayServer(RelaySettings.from_profile(profile), lambda tap, bridge: None)
            with pytest.raises(BackendError, match=re.escape(f"127.0.0.1:{port}")):
                await relay.start()

        asyncio.run(main())


# --- a client that sends but never reads; frames longer than the limit; lost hand-overs -------

PING = masked(Opcode.PING, b"p" * 125)


async def flood_pings(h: Harness) -> tuple[socket.socket, int, int]:
    """A raw client that sends pings (at most 8 MiB, 10 s) and reads nothing; returns its socket,
    the bytes it got out and the server's largest send buffer for it meanwhile."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", h.port))
    await loop.sock_sendall(sock, handshake())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await asyncio.wait_for(loop.sock_recv(sock, 4096), TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    [conn] = [c for c in h.relay.connections if c.session.tap == "wstap1"]
    assert conn.transport is not None
    # Little room in the kernel on the server's side too: the pongs pile up in the transport.
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    batch = PING * 100
    sent, peak = 0, 0
    deadline = loop.time() + 10
    while sent < 8 * 1024 * 1024 and loop.time() < deadline:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, batch), 0.5)
        except TimeoutError:
            break  # the server no longer reads from this client
        except (ConnectionResetError, BrokenPipeError):
            break  # the server dropped this client
        sent += len(batch)
        if not conn.transport.is_closing():
            peak = max(peak, conn.transport.get_write_buffer_size())
    return sock, sent, peak


async def still_relays(h: Harness, ws: Any) -> None:
    await ws.send(FRAME)
    assert await h.tap_recv("wstap0") == FRAME
    h.taps.peers["wstap0"].send(REPLY)
    assert await asyncio.wait_for(ws.recv(), TIMEOUT) == REPLY
    await asyncio.wait_for(ws.ping(), TIMEOUT)


def test_a_ping_flood_that_is_never_read_pauses_the_client_not_memory():
    async def body(h: Harness) -> None:
        async with connect(h.url, compression=None) as live:
            sock, sent, peak = await flood_pings(h)
            [conn] = [c for c in h.relay.connections if c.session.tap == "wstap1"]
            assert conn.transport is not None
            print(f"flooded {sent} bytes of pings; server send buffer peak {peak} B")
            # Reading stopped once the buffer passed its high mark; one read's worth of pongs
            # may follow, nothing more.
            assert peak <= 2 * WRITE_HIGH, peak
            assert conn.read_pauses == {"writing"} and not conn.closing
            await still_relays(h, live)
            # Once the client reads, the server reads again, and answers the rest.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT
            while conn.read_pauses or conn.transport.get_write_buffer_size():
                assert loop.time() < deadline, "reading from the client did not resume"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 0.1)
            assert not conn.closing and h.relay.stats["write_overflows"] == 0
            sock.close()

    run(body)


def test_a_send_buffer_over_the_hard_cap_aborts_the_client(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    import wsnic.relay.server as server_module

    # The pause keeps a real buffer far below the cap; a cap at the high mark trips at once.
    monkeypatch.setattr(server_module, "WRITE_CAP", WRITE_HIGH)
    caplog.set_level(logging.INFO, logger="wsnic.relay")

    async def body(h: Harness) -> None:
        async with connect(h.url, compression=None) as live:
            sock, _, _ = await flood_pings(h)
            await asyncio.sleep(0.1)
            assert h.relay.stats["write_overflows"] == 1
            assert [c.session.tap for c in h.relay.connections] == ["wstap0"]
            await still_relays(h, live)
            sock.close()

    run(body)
    assert re.search(r"left after [\d.]+ s \(send buffer over 262144 bytes: the client does "
                     r"not read\); network default, wstap1", caplog.text), caplog.text


def test_tap_frames_longer_than_max_frame_size_are_dropped_not_truncated():
    async def body(h: Harness) -> None:
        async with connect(h.url, compression=None) as ws:
            peer = h.taps.peers["wstap0"]
            peer.send(REPLY + bytes(100))  # 160 bytes: over the limit of 64
            exactly = REPLY + b"1234"  # 64 bytes: at the limit
            peer.send(exactly)
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == exactly
            assert h.relay.counters.drops[Drop.OVERSIZED] == 1
            assert h.relay.counters.frames_out == 1

    run(body, max_frame_size=64)


def test_a_tls_hand_over_without_a_certificate_is_reported_ended():
    profile = Profile.model_validate({"server": {"ws_port": free_port()}})
    ended: list[int] = []

    async def main() -> None:
        relay = RelayServer(RelaySettings.from_profile(profile), lambda tap, bridge: None,
                            on_connection_closed=lambda: ended.append(1))
        await relay.start(listen=False)
        try:
            ours, theirs = socket.socketpair()
            relay.adopt(ours, tls=True, refuse=False)
            theirs.settimeout(TIMEOUT)
            assert theirs.recv(1) == b""  # closed: this worker cannot speak TLS
            theirs.close()
            assert ended == [1]
        finally:
            await relay.stop()

    asyncio.run(main())
