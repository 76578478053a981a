"""HTTP answers before the upgrade, through the websockets sans-I/O protocol layer."""

import base64

from websockets.http11 import Request
from websockets.server import ServerProtocol

from wsnic.config.models import Network, Profile, Server
from wsnic.relay import http as answers
from wsnic.relay.settings import RelaySettings

KEY = base64.b64encode(b"0123456789abcdef").decode()
ONE = Profile()
TWO = Profile(networks=(
    Network(name="lab", path="/lab", bridge="wsbr1", subnet="10.1.0.0/24"),
    Network(name="dev", path="/dev", bridge="wsbr2", subnet="10.2.0.0/24"),
))


def upgrade(path: str, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


def plain(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: h\r\nAccept: text/html\r\n\r\n".encode()


def decide(raw: bytes, profile: Profile, clients: int = 0):
    protocol = ServerProtocol()
    protocol.receive_data(raw)
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    result = answers.answer(protocol, request, RelaySettings.from_profile(profile), clients)
    protocol.send_response(result.response)
    wire = b"".join(protocol.data_to_send())
    return result, wire, protocol


def test_valid_upgrade_gets_101_and_network():
    result, wire, protocol = decide(upgrade("/anything?token=1"), ONE)
    assert result.network is not None and result.network.name == "default"
    assert wire.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert protocol.state.name == "OPEN"


def test_plain_request_gets_the_426_page_and_close():
    result, wire, _ = decide(plain(), ONE)
    assert result.network is None
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"Upgrade: websocket" in head and b"Content-Type: text/html" in head
    assert b"Connection: close" in head
    assert b"missing or invalid WebSocket upgrade" in body
    assert b"TLS test succeeded" in body
    assert f"Content-Length: {len(body)}".encode() in head


def test_broken_key_also_gets_the_426_page():
    raw = upgrade("/").replace(KEY.encode(), b"short")
    result, wire, _ = decide(raw, ONE)
    assert result.network is None and wire.startswith(b"HTTP/1.1 426 ")


def test_paths_select_networks_and_query_is_ignored():
    result, _, _ = decide(upgrade("/dev?x=/lab"), TWO)
    assert result.network is not None and result.network.bridge == "wsbr2"
    result, _, _ = decide(upgrade("/lab/"), TWO)
    assert result.network is not None and result.network.bridge == "wsbr1"


def test_unknown_path_gets_404_before_the_upgrade():
    result, wire, protocol = decide(upgrade("/nope?token=1"), TWO)
    assert result.network is None
    assert wire.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"'/nope'" in wire and b"token" not in wire
    assert protocol.state.name != "OPEN"


def test_full_server_gets_503():
    profile = Profile(server=Server(max_clients=2))
    result, _, _ = decide(upgrade("/"), profile, clients=1)
    assert result.network is not None
    result, wire, _ = decide(upgrade("/"), profile, clients=2)
    assert result.network is None
    assert wire.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"all 2 client slots" in wire


def parsed(raw: bytes) -> Request:
    protocol = ServerProtocol()
    protocol.receive_data(raw)
    [request] = protocol.events_received()
    assert isinstance(request, Request)
    return request


def test_forwarded_for_first_address():
    xff = parsed(upgrade("/", "X-Forwarded-For: 203.0.113.5, 10.0.0.1\r\n"))
    assert answers.forwarded_for(xff) == "203.0.113.5"
    assert answers.forwarded_for(parsed(upgrade("/"))) is None


def test_headers_split_across_reads_are_parsed():
    protocol = ServerProtocol()
    raw = upgrade("/")
    for i in range(0, len(raw), 7):
        assert protocol.events_received() == []
        protocol.receive_data(raw[i:i + 7])
    [request] = protocol.events_received()
    assert isinstance(request, Request) and request.path == "/"
