"""The relay with real TAPs, bridges and guests, each in throwaway wsnt- namespaces.

A server namespace holds the bridge(s) and runs tests.helpers.relay_host; every guest is its own
namespace whose eth0 is a TAP copied over ws:// or wss:// by tests.helpers.connector. Raw test
clients open their sockets inside the server namespace (call_in_netns) and talk to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect as aconnect
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as sconnect

from tests.helpers.guest import Guest, guest, ping, stop_process, udhcpc
from tests.helpers.netns import netns, sh
from tests.helpers.relay_host import RelayProcess, running_relay
from wsnic.backends._netns import call_in_netns
from wsnic.errors import BackendError
from wsnic.relay.tap import open_tap

pytestmark = pytest.mark.root

WS_PORT, WSS_PORT = 8086, 8087
BRIDGE_IP = "192.168.86.1"
MAX_FRAME = 1514
FD_SLACK = 2  # the fd count may differ by this much from its level before a test
RSS_SLACK_KIB = 16 * 1024  # Python keeps freed arenas; growth beyond this is a leak
TIMEOUT = 10.0


# --- environment ------------------------------------------------------------------------------

def add_bridge(ns: str, name: str, cidr: str) -> None:
    sh(["ip", "link", "add", name, "type", "bridge"], netns=ns)
    sh(["ip", "addr", "add", cidr, "dev", name], netns=ns)
    sh(["ip", "link", "set", name, "up"], netns=ns)


def taps(ns: str) -> list[str]:
    out = sh(["ip", "-o", "link", "show"], netns=ns).stdout
    return re.findall(r"^\d+: (wstap\d+)[:@]", out, flags=re.M)


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway self-signed certificate, its key, and both in one PEM file."""
    d = tmp_path_factory.mktemp("certs")
    cert, key, both = d / "cert.pem", d / "key.pem", d / "both.pem"
    sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)])
    both.write_text(cert.read_text() + key.read_text())
    return {"cert": cert, "key": key, "both": both}


@dataclass
class Env:
    ns: str
    relay: RelayProcess
    fds: int = 0  # the relay's fd count with only the module's guests connected
    rss: int = 0

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{WS_PORT}"

    @property
    def wss(self) -> str:
        return f"wss://127.0.0.1:{WSS_PORT}"


@contextlib.contextmanager
def relay_env(tag: str, args: list[str],
              bridges: tuple[tuple[str, str], ...] = (("wsbr0", f"{BRIDGE_IP}/24"),)
              ) -> Iterator[Env]:
    with netns(tag) as ns:
        for name, cidr in bridges:
            add_bridge(ns, name, cidr)
        with running_relay(ns, ["--ws-port", str(WS_PORT), *args]) as relay:
            yield Env(ns, relay)
        assert taps(ns) == [], "TAPs left after the relay stopped"


@pytest.fixture(scope="module")
def env(certs: dict[str, Path]) -> Iterator[Env]:
    with relay_env("rlsrv", ["--wss-port", str(WSS_PORT), "--cert", str(certs["cert"]),
                             "--key", str(certs["key"]),
                             "--max-frame-size", str(MAX_FRAME)]) as e:
        yield e


@dataclass
class Pair:
    a: Guest
    b: Guest


@pytest.fixture(scope="module")
def pair(env: Env) -> Iterator[Pair]:
    """Two well-behaved guests that stay connected for the whole module."""
    with guest(env.ns, env.ws + "/", "rlga", address="192.168.86.10/24") as a, \
            guest(env.ns, env.ws + "/any?x=1", "rlgb", address="192.168.86.11/24") as b:
        assert ping(a.ns, BRIDGE_IP)
        env.fds, env.rss = env.relay.fd_count(), env.relay.rss_kib()
        yield Pair(a, b)


def assert_clean_log(relay: RelayProcess) -> None:
    log = relay.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-5000:]


def assert_healthy(env: Env, pair: Pair) -> None:
    """The module's guests still talk, and the relay is back to its resting state."""
    assert ping(pair.a.ns, "192.168.86.11"), env.relay.log()[-3000:]
    assert_clean_log(env.relay)
    wait_for(lambda: len(taps(env.ns)) == 2, "only the two guests' TAPs")
    wait_for(lambda: env.relay.fd_count() <= env.fds + FD_SLACK,
             f"relay fd count back to {env.fds} (+{FD_SLACK})")
    assert env.relay.stats()["client_count"] == 2
    assert env.relay.proc.poll() is None


# --- raw clients inside the server namespace --------------------------------------------------

HANDSHAKE = (b"GET /split HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
             b"Sec-WebSocket-Version: 13\r\n\r\n")


def tcp(ns: str, port: int, rcvbuf: int | None = None) -> socket.socket:
    """A TCP connection to 127.0.0.1:port made inside `ns` (usable from any thread)."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", port))
        return sock

    return call_in_netns(ns, make)


def upgraded(ns: str, port: int = WS_PORT, rcvbuf: int | None = None,
             first: bytes = HANDSHAKE) -> tuple[socket.socket, bytes]:
    """A raw WebSocket connection: the 101 is read; returns the socket and bytes after it."""
    sock = tcp(ns, port, rcvbuf)
    sock.sendall(first)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return sock, rest


def insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def ws_client(env: Env, path: str = "/", **kwargs: Any) -> ClientConnection:
    ws: ClientConnection = sconnect(env.ws + path, sock=tcp(env.ns, WS_PORT), compression=None,
                                    max_size=None, open_timeout=TIMEOUT, **kwargs)
    return ws


def read_all(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything until the server closes (bounded by `timeout`)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            break
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError("the server did not close the connection")
    return data




def masked(data: bytes, opcode: Opcode = Opcode.BINARY, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True)


# --- ethernet helpers -------------------------------------------------------------------------

def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac_bytes(src_mac),
                       socket.inet_aton(src_ip), b"\0" * 6, socket.inet_aton(target_ip))
    return b"\xff" * 6 + mac_bytes(src_mac) + b"\x08\x06" + body + bytes(18)


def is_arp_reply_from(frame: bytes, ip: str) -> bool:
    return (len(frame) >= 42 and frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02"
            and frame[28:32] == socket.inet_aton(ip))


def wait_arp_reply(ws: ClientConnection, ip: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = ws.recv(timeout=left)
        if isinstance(message, bytes) and is_arp_reply_from(message, ip):
            return
    raise AssertionError(f"no ARP reply from {ip}")


def recv_arp_reply_raw(sock: socket.socket, ip: str, buf: bytes = b"",
                       timeout: float = TIMEOUT) -> None:
    """Parse server frames (unmasked) from `buf`, then the socket, until an ARP reply."""
    ws_frames(sock, lambda payload: is_arp_reply_from(payload, ip), timeout, buf)


@contextlib.contextmanager
def capture(ns: str, dev: str) -> Iterator[Callable[[], list[bytes]]]:
    """Frames seen on `dev` inside `ns` (AF_PACKET, ETH_P_ALL) while the block runs."""
    def make() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        s.bind((dev, 0))
        s.setblocking(False)
        return s

    sock = call_in_netns(ns, make)

    def drain() -> list[bytes]:
        frames = []
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(sock.recv(65536))
        return frames

    try:
        yield drain
    finally:
        sock.close()


# --- core: guests ping through the relay ------------------------------------------------------

def test_two_guests_ping_each_other_and_the_bridge_over_ws(env: Env, pair: Pair) -> None:
    assert ping(pair.a.ns, BRIDGE_IP)
    assert ping(pair.a.ns, "192.168.86.11")
    assert ping(pair.b.ns, "192.168.86.10")
    ports = sh(["ip", "-o", "link", "show", "master", "wsbr0"], netns=env.ns).stdout
    assert len(re.findall(r"wstap\d+", ports)) == 2
    log = env.relay.log()
    assert re.search(r"127\.0\.0\.1:\d+ connected on /any: network default \(wsbr0\), "
                     r"wstap\d+ ([0-9a-f]{2}:){5}[0-9a-f]{2}", log), log


def test_two_guests_ping_over_wss(env: Env, pair: Pair) -> None:
    with guest(env.ns, env.wss + "/", "rlsa", insecure=True, address="192.168.86.20/24") as a, \
            guest(env.ns, env.wss + "/", "rlsb", insecure=True,
                  address="192.168.86.21/24") as b:
        assert ping(a.ns, "192.168.86.21")
        assert ping(b.ns, "192.168.86.20")
        assert ping(b.ns, BRIDGE_IP)
        assert ping(a.ns, "192.168.86.11")  # wss and ws guests share the segment
        assert len(taps(env.ns)) == 4
    assert_healthy(env, pair)


def test_a_guest_gets_a_dhcp_lease_through_the_relay(env: Env, pair: Pair,
                                                     tmp_path: Path) -> None:
    argv = ["ip", "netns", "exec", env.ns, "dnsmasq", "--keep-in-foreground",
            "--conf-file=/dev/null", "--port=0", "--interface=wsbr0", "--bind-interfaces",
            "--dhcp-range=192.168.86.100,192.168.86.150,255.255.255.0,1h",
            f"--dhcp-leasefile={tmp_path / 'leases'}", f"--pid-file={tmp_path / 'pid'}",
            "--dhcp-authoritative", "--log-facility=-"]
    dnsmasq = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with guest(env.ns, env.ws + "/", "rldh") as g:
            leased = udhcpc(g.ns, g.tap)
            assert any(a.startswith("192.168.86.1") and a.endswith("/24") for a in leased), leased
            assert ping(g.ns, BRIDGE_IP)
    finally:
        stop_process(dnsmasq)  # type: ignore[arg-type]
    assert_healthy(env, pair)


def test_http_without_upgrade_gets_the_426_page_on_ws_and_wss(env: Env, pair: Pair) -> None:
    request = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: text/html\r\n\r\n"
    plain = tcp(env.ns, WS_PORT)
    plain.sendall(request)
    page = read_all(plain)
    plain.close()
    assert page.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    raw = tcp(env.ns, WSS_PORT)
    tls = insecure_context().wrap_socket(raw, server_hostname="localhost")
    tls.sendall(request)
    page = read_all(tls)
    tls.close()
    assert page.startswith(b"HTTP/1.1 426 ")
    assert b"missing or invalid WebSocket upgrade" in page and b"TLS test succeeded" in page
    assert_healthy(env, pair)


def test_url_paths_select_separate_l2_segments() -> None:
    nets = ["--network", "lab:/lab:wsbr0:192.168.86.0/24",
            "--network", "dev:/dev:wsbr1:192.168.87.0/24"]
    bridges = (("wsbr0", "192.168.86.1/24"), ("wsbr1", "192.168.87.1/24"))
    with relay_env("rlnet", nets, bridges) as e, \
            guest(e.ns, e.ws + "/lab", "rlla", address="192.168.86.10/24") as a, \
            guest(e.ns, e.ws + "/dev?token=x", "rldv", address="192.168.87.10/24") as b:
        # Both guests also share a subnet that only a common segment could carry.
        sh(["ip", "addr", "add", "10.99.0.1/24", "dev", a.tap], netns=a.ns)
        sh(["ip", "addr", "add", "10.99.0.2/24", "dev", b.tap], netns=b.ns)
        assert ping(a.ns, "192.168.86.1")
        assert ping(b.ns, "192.168.87.1")
        with capture(b.ns, b.tap) as seen_by_b:
            assert not ping(a.ns, "10.99.0.2", count=2, deadline=3)
            frames = seen_by_b()
            assert ping(b.ns, "192.168.87.1", count=1)  # control: the capture works
            control = seen_by_b()
        assert not [f for f in frames if f[6:12] == mac_bytes(a.mac)], "B saw A's frames"
        assert control, "the capture on B saw nothing at all"
        neigh = sh(["ip", "neigh", "show", "10.99.0.2"], netns=a.ns).stdout
        assert "REACHABLE" not in neigh and "STALE" not in neigh, neigh
        for tap, bridge in zip(sorted(taps(e.ns)), ("wsbr0", "wsbr1"), strict=True):
            master = sh(["ip", "-o", "link", "show", tap], netns=e.ns).stdout
            assert f"master {bridge}" in master
        # An unknown path is refused before the upgrade.
        sock = tcp(e.ns, WS_PORT)
        sock.sendall(HANDSHAKE.replace(b"/split", b"/other"))
        assert read_all(sock).startswith(b"HTTP/1.1 404 ")
        sock.close()


def test_server_full_gets_503_and_combined_pem_serves_wss(certs: dict[str, Path]) -> None:
    args = ["--max-clients", "1", "--wss-port", str(WSS_PORT), "--cert", str(certs["both"])]
    with relay_env("rlful", args) as e:
        with sconnect(e.wss + "/", sock=tcp(e.ns, WSS_PORT), ssl=insecure_context(),
                      server_hostname="localhost", open_timeout=TIMEOUT):
            sock = tcp(e.ns, WS_PORT)
            sock.sendall(HANDSHAKE)
            answer = read_all(sock)
            sock.close()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"all 1 client slots" in answer
        wait_for(lambda: taps(e.ns) == [], "the first client's TAP to go")
        with ws_client(e):
            assert len(taps(e.ns)) == 1
        assert e.relay.stats()["stats"]["refused_503"] == 1


# --- robustness: a well-behaved pair keeps working throughout ----------------------------------

def client_line(relay: RelayProcess, port: int) -> str:
    """The relay's disconnect summary for the client whose local port was `port`."""
    pattern = re.compile(rf"^.*127\.0\.0\.1:{port} left after .*$", re.M)
    found: list[str] = []

    def check() -> bool:
        found[:] = pattern.findall(relay.log())
        return bool(found)

    wait_for(check, f"the summary line of client port {port}")
    return found[0]


def test_garbage_instead_of_a_handshake(env: Env, pair: Pair) -> None:
    junk = [
        os.urandom(300) + b"\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
        b"NOT-HTTP at all\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        b"x" * 9000,  # a request line that never ends
    ]
    for data in junk:
        sock = tcp(env.ns, WS_PORT)
        sock.sendall(data)
        answer = read_all(sock)
        sock.close()
        assert not answer.startswith(b"HTTP/1.1 101"), answer
    # Plain bytes on the TLS port, and a client that sends half a request then hangs up.
    sock = tcp(env.ns, WSS_PORT)
    sock.sendall(b"GET / HTTP/1.1\r\n\r\n" + os.urandom(100))
    read_all(sock)
    sock.close()
    sock = tcp(env.ns, WS_PORT)
    sock.sendall(b"GET / HTTP/1.1\r\nHost:")
    sock.shutdown(socket.SHUT_WR)
    assert read_all(sock) == b""
    sock.close()
    assert env.relay.stats()["stats"]["bad_requests"] >= 4
    assert_healthy(env, pair)


def test_handshake_then_garbage(env: Env, pair: Pair) -> None:
    for garbage in (os.urandom(2000), Frame(Opcode.BINARY, b"unmasked").serialize(mask=False),
                    b"\x8f\x80\x00\x00\x00\x00"):  # reserved opcode
        sock, _ = upgraded(env.ns)
        sock.sendall(garbage)
        read_all(sock)  # the server closes (1002 or 1009), whatever it sent first
        sock.close()
    assert_healthy(env, pair)


def test_text_runts_oversized_and_fragments(env: Env, pair: Pair) -> None:
    me = "02:00:00:00:aa:01"
    arp = arp_request(me, "192.168.86.99", BRIDGE_IP)
    with ws_client(env) as ws:
        port = ws.local_address[1]
        ws.send("a text message")
        ws.send(b"\x01" * 13)  # runt
        ws.send(arp + bytes(MAX_FRAME))  # oversized
        ws.send([arp[:5], arp[5:30], arp[30:]])  # one message in three fragments
        wait_arp_reply(ws, BRIDGE_IP)  # so it reached the bridge whole
        ws.send([arp[:20], bytes(MAX_FRAME)])  # fragmented, over the limit
        assert ws.ping().wait(TIMEOUT), "the client was disconnected"
        ws.send(arp)
        wait_arp_reply(ws, BRIDGE_IP)
    line = client_line(env.relay, port)
    assert "closed by client" in line
    assert "dropped text=1 runt=1 oversized=2" in line, line
    assert "from client 2 frames/" in line, line
    assert_healthy(env, pair)


def test_headers_split_across_tcp_segments(env: Env, pair: Pair) -> None:
    arp = masked(arp_request("02:00:00:00:aa:02", "192.168.86.98", BRIDGE_IP))
    sock = tcp(env.ns, WS_PORT)
    sock.sendall(HANDSHAKE[:25])
    time.sleep(0.2)
    sock.sendall(HANDSHAKE[25:60])
    time.sleep(0.2)
    sock.sendall(HANDSHAKE[60:] + arp[:7])  # the first frame starts in the last header segment
    time.sleep(0.2)
    sock.sendall(arp[7:])
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    recv_arp_reply_raw(sock, BRIDGE_IP, rest)  # the frame got through whole
    sock.close()
    assert_healthy(env, pair)


def test_a_client_that_never_reads_while_another_streams(env: Env, pair: Pair) -> None:
    slow, _ = upgraded(env.ns, rcvbuf=4096)
    rss_before = env.relay.rss_kib()
    pings: list[bool] = []

    def keep_pinging() -> None:
        for _ in range(3):
            pings.append(ping(pair.a.ns, "192.168.86.11", count=3, deadline=6))

    pinger = threading.Thread(target=keep_pinging)
    pinger.start()
    frame = b"\xff" * 6 + mac_bytes("02:00:00:00:bb:01") + b"\x88\xb5" + bytes(1000)
    sent, peak = 0, rss_before
    deadline = time.monotonic() + 15
    try:
        with ws_client(env) as streamer:
            while sent < 20000 and time.monotonic() < deadline:
                streamer.send(frame)
                sent += 1
                if sent % 2000 == 0:
                    peak = max(peak, env.relay.rss_kib())
            peak = max(peak, env.relay.rss_kib())
    finally:
        pinger.join(30)
    stats = env.relay.stats()
    print(f"streamed {sent} frames; relay RSS {rss_before} -> peak {peak} KiB; "
          f"drops {stats['counters']}")
    assert stats["counters"]["drop_client_slow"] > 0
    assert peak - rss_before < RSS_SLACK_KIB
    assert pings and all(pings), pings
    slow.close()
    assert_healthy(env, pair)


def test_200_clients_connect_and_disconnect(env: Env, pair: Pair) -> None:
    frame = b"\xff" * 6 + mac_bytes("02:00:00:00:cc:01") + b"\x88\xb5" + bytes(46)
    upgrades_before = env.relay.stats()["stats"]["upgrades"]

    async def one(i: int) -> None:
        sock = tcp(env.ns, WS_PORT)
        sock.setblocking(False)
        ws = await aconnect(env.ws + f"/c{i}", sock=sock, open_timeout=TIMEOUT,
                            close_timeout=2, compression=None)
        await ws.send(frame)
        if i % 3 == 0:
            ws.transport.abort()  # vanish without a close handshake (TCP RST)
        elif i % 3 == 1:
            await ws.close()
        else:
            ws.transport.close()  # TCP FIN without a close frame

    async def waves() -> None:
        for wave in range(10):
            await asyncio.gather(*(one(wave * 20 + i) for i in range(20)))

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(waves(), 60))
    print(f"200 connect/disconnect cycles in {time.monotonic() - started:.1f} s")
    assert env.relay.stats()["stats"]["upgrades"] - upgrades_before == 200
    assert_healthy(env, pair)
    rss = env.relay.rss_kib()
    assert rss - env.rss < RSS_SLACK_KIB, (env.rss, rss)


def test_idle_clients_are_pinged_and_silent_ones_dropped() -> None:
    args = ["--ping-interval", "0.3", "--ping-timeout", "1.0"]
    with relay_env("rlidl", args) as e, \
            guest(e.ns, e.ws + "/", "rlig", address="192.168.86.10/24") as g:
        silent, _ = upgraded(e.ns)
        mute = tcp(e.ns, WS_PORT)  # connects, never sends a request
        assert read_all(mute, timeout=5) == b""
        mute.close()
        data = read_all(silent, timeout=5)  # never answered the pings: closed
        silent.close()
        assert b"\x89\x05wsnic" in data, data  # pinged
        assert b"\x88" in data and b"\x03\xe9idle timeout" in data, data  # closed with 1001
        time.sleep(1.5)  # longer than the timeout: the connector answers pings, stays
        assert len(taps(e.ns)) == 1
        assert ping(g.ns, BRIDGE_IP)
        assert re.search(r"left after .* \(idle timeout: silent for", e.relay.log())
        assert_clean_log(e.relay)


def test_sigterm_while_clients_are_leaving() -> None:
    with relay_env("rlsig", []) as e:
        async def scenario() -> list[int | None]:
            clients = []
            for i in range(30):
                sock = tcp(e.ns, WS_PORT)
                sock.setblocking(False)
                clients.append(await aconnect(e.ws + f"/{i}", sock=sock,
                                              open_timeout=TIMEOUT, close_timeout=2))
            assert len(taps(e.ns)) == 30
            leaving = [asyncio.create_task(ws.close()) for ws in clients[:15]]
            await asyncio.sleep(0.005)
            os.kill(e.relay.pid, signal.SIGTERM)
            await asyncio.gather(*leaving, return_exceptions=True)
            codes = []
            for ws in clients[15:]:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
                codes.append(ws.close_code)
            return codes

        codes = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert e.relay.proc.wait(15) == 0
        assert taps(e.ns) == []
        assert codes == [1001] * 15, codes  # told "going away" before the server exited
        assert "relay stopped" in e.relay.log()
        assert_clean_log(e.relay)


def test_open_tap_lives_exactly_as_long_as_its_fd(ns: str) -> None:
    fd, name, mac = call_in_netns(ns, lambda: open_tap("wstap%d"))
    try:
        assert name == "wstap0"
        assert not os.get_blocking(fd) and not os.get_inheritable(fd)
        shown = sh(["ip", "-o", "link", "show", "dev", name], netns=ns).stdout
        assert f"link/ether {mac}" in shown
        with pytest.raises(BlockingIOError):
            os.read(fd, 2048)
        fd2, name2, _ = call_in_netns(ns, lambda: open_tap("wstap%d"))
        os.close(fd2)
        assert name2 == "wstap1"
    finally:
        os.close(fd)
    assert taps(ns) == []
    with pytest.raises(BackendError, match="x" * 16):
        call_in_netns(ns, lambda: open_tap("x" * 16))


# --- a client that sends but never reads; frames longer than the limit from the TAP -----------

def test_a_ping_flood_that_is_never_read_stays_bounded(env: Env, pair: Pair) -> None:
    flooder, _ = upgraded(env.ns, rcvbuf=4096)
    rss_before = env.relay.rss_kib()
    batch = masked(b"p" * 125, Opcode.PING) * 200
    flooder.settimeout(0.5)
    sent, peak, stalled = 0, rss_before, False
    deadline = time.monotonic() + 10
    try:
        while sent < 48 * 1024 * 1024 and time.monotonic() < deadline:
            flooder.sendall(batch)
            sent += len(batch)
            if sent % (100 * len(batch)) == 0:
                peak = max(peak, env.relay.rss_kib())
    except TimeoutError:
        stalled = True  # the relay stopped reading from this client
    peak = max(peak, env.relay.rss_kib())
    stats = env.relay.stats()
    print(f"flooded {sent} bytes of pings; relay RSS {rss_before} -> peak {peak} KiB")
    assert stalled, f"the relay read all {sent} bytes of pings"
    assert peak - rss_before < RSS_SLACK_KIB
    assert stats["stats"]["write_overflows"] == 0
    assert stats["connections"] == 3  # the flooder is paused, not dropped
    assert ping(pair.a.ns, "192.168.86.11")
    flooder.close()
    assert_healthy(env, pair)


def ws_frames(sock: socket.socket, done: Callable[[bytes], bool],
              timeout: float = TIMEOUT, buf: bytes = b"") -> list[bytes]:
    """Payloads of the server's (unmasked) frames in `buf`, then on `sock`, up to the first
    that is `done`."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buf) >= 2:
            length, head = buf[1] & 0x7F, 2
            if length == 126:
                if len(buf) < 4:
                    break
                length, head = struct.unpack("!H", buf[2:4])[0], 4
            if len(buf) < head + length:
                break
            frames.append(buf[head:head + length])
            buf = buf[head + length:]
            if done(frames[-1]):
                return frames
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        buf += chunk
    raise AssertionError(f"not found in {len(frames)} frames")


def test_tap_frames_over_max_frame_size_are_dropped_not_truncated() -> None:
    me, my_ip = "02:00:00:00:dd:01", "192.168.86.99"

    def echo_to_me(frame: bytes) -> bool:  # an IPv4 ICMP echo request to my_ip
        return (len(frame) >= 35 and frame[12:14] == b"\x08\x00" and frame[23] == 1
                and frame[30:34] == socket.inet_aton(my_ip) and frame[34] == 8)

    with relay_env("rlbig", ["--max-frame-size", "100"]) as e:
        sock, rest = upgraded(e.ns)
        # The bridge learns on which port `me` is, and the host where my_ip is.
        sock.sendall(masked(arp_request(me, my_ip, BRIDGE_IP)))
        recv_arp_reply_raw(sock, BRIDGE_IP, rest)
        sh(["ip", "neigh", "replace", my_ip, "lladdr", me, "dev", "wsbr0", "nud", "permanent"],
           netns=e.ns)
        for size in ("500", "16"):  # frames of 542 and of 58 bytes
            sh(["busybox", "ping", "-c", "1", "-W", "1", "-s", size, my_ip], netns=e.ns,
               check=False, timeout=10)
        echoes = [f for f in ws_frames(sock, echo_to_me) if echo_to_me(f)]
        assert [len(f) for f in echoes] == [58]  # the long one never came, not even cut short
        sock.close()
        stats = e.relay.stats()
        assert stats["counters"]["drop_oversized"] >= 1, stats
        assert_clean_log(e.relay)
