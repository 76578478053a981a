"""The few HTTP answers the relay gives before (or instead of) the WebSocket upgrade.

`answer()` decides, for one parsed request, whether the client is let in and on which network,
or which HTTP response refuses it. It uses the websockets sans-I/O ServerProtocol for the RFC
6455 checks and builds the refusals itself.
"""

from __future__ import annotations

import email.utils
import http
from dataclasses import dataclass

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from wsnic.relay.settings import RelayNetwork, RelaySettings

# The original's page: a browser pointed at the server (often to accept a self-signed
# certificate) learns that TLS works and that this is not a web server.
UPGRADE_REQUIRED_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>wsnic</title></head>
<body style="font-size:130%">
<h3>wsnic WebSocket network server</h3>
<p>HTTP request refused, missing or invalid WebSocket upgrade.</p>
<p>If this request's purpose is to test the TLS certificate: \
<b style="color:green">TLS test succeeded</b>.</p>
</body></html>
"""


def _response(status: http.HTTPStatus, body: str, content_type: str) -> Response:
    data = body.encode()
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


def upgrade_required() -> Response:
    """426 with the HTML page, for a request that is not a valid WebSocket upgrade."""
    response = _response(
        http.HTTPStatus.UPGRADE_REQUIRED, UPGRADE_REQUIRED_PAGE, "text/html; charset=utf-8"
    )
    response.headers["Upgrade"] = "websocket"
    return response


def not_found(path: str) -> Response:
    return _response(
        http.HTTPStatus.NOT_FOUND,
        f"No network is served at {path.split('?', 1)[0]!r}.\n",
        "text/plain; charset=utf-8",
    )


def unavailable(max_clients: int) -> Response:
    response = _response(
        http.HTTPStatus.SERVICE_UNAVAILABLE,
        f"Server full: all {max_clients} client slots are taken; try again later.\n",
        "text/plain; charset=utf-8",
    )
    response.headers["Retry-After"] = "10"
    return response


def internal_error() -> Response:
    return _response(
        http.HTTPStatus.INTERNAL_SERVER_ERROR,
        "The network port for this client could not be set up; see the server log.\n",
        "text/plain; charset=utf-8",
    )


@dataclass(frozen=True)
class Answer:
    """The decision for one request: `network` is set only when `response` is the 101."""

    response: Response
    network: RelayNetwork | None
    why: str  # for the log: "accepted", "unknown path", the handshake error …


def answer(protocol: ServerProtocol, request: Request, settings: RelaySettings,
           clients: int) -> Answer:
    """Decide on `request`; the caller sends `answer.response` with protocol.send_response."""
    network = settings.network_for_path(request.path)
    if network is None:
        return Answer(not_found(request.path), None,
                      f"unknown path {request.path.split('?', 1)[0]!r}")
    response = protocol.accept(request)
    if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
        cause = protocol.handshake_exc
        return Answer(upgrade_required(), None, f"no valid WebSocket upgrade ({cause})")
    if clients >= settings.max_clients:
        return Answer(
            unavailable(settings.max_clients), None,
            f"server full ({settings.max_clients} clients)",
        )
    return Answer(response, network, "accepted")


def forwarded_for(request: Request) -> str | None:
    """The first (client) address of X-Forwarded-For, or None."""
    values = request.headers.get_all("X-Forwarded-For")
    if not values:
        return None
    first = values[0].split(",", 1)[0].strip()
    return first or None
