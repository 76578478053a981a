"""What the relay needs to know of a profile, as plain frozen dataclasses.

The relay never sees the pydantic `Profile`: a relay worker process would otherwise import
pydantic and the models (about 20 MB of a worker's 38) only to read a dozen values. The profile
is validated once, in the main process; `RelaySettings.from_profile` copies what the relay uses,
and `to_json`/`from_json` carry it to a worker.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsnic.config.models import Profile


@dataclass(frozen=True)
class RelayNetwork:
    name: str
    path: str  # the WebSocket URL path that selects this network
    bridge: str


@dataclass(frozen=True)
class RelaySettings:
    address: str
    ws_port: int
    wss_port: int
    certificate: str | None  # wss:// is served only when this is set
    private_key: str | None
    ping_interval: float
    ping_timeout: float
    max_frame_size: int
    max_clients: int
    tap_name: str
    trust_proxy: bool
    networks: tuple[RelayNetwork, ...]

    @classmethod
    def from_profile(cls, profile: Profile) -> RelaySettings:
        srv = profile.server
        return cls(
            address=str(srv.address),
            ws_port=srv.ws_port,
            wss_port=srv.wss_port,
            certificate=str(srv.tls.certificate) if srv.tls.certificate is not None else None,
            private_key=str(srv.tls.private_key) if srv.tls.private_key is not None else None,
            ping_interval=srv.ping_interval,
            ping_timeout=srv.ping_timeout,
            max_frame_size=srv.max_frame_size,
            max_clients=srv.max_clients,
            tap_name=srv.tap_name,
            trust_proxy=srv.trust_proxy,
            networks=tuple(RelayNetwork(n.name, n.path, n.bridge) for n in profile.networks),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RelaySettings:
        networks = tuple(RelayNetwork(**net) for net in data["networks"])
        return cls(**{**data, "networks": networks})

    def network_for_path(self, path: str) -> RelayNetwork | None:
        """The network a WebSocket URL path selects; the first one also answers '/'."""
        path = path.split("?", 1)[0] or "/"
        if len(self.networks) == 1:
            return self.networks[0]
        for net in self.networks:
            if net.path.rstrip("/") == path.rstrip("/") and net.path != "/":
                return net
        return self.networks[0] if path == "/" else None
