"""The profile: wsnic's desired state, validated by pydantic and frozen.

Everything here is checkable without looking at the host. Host-dependent checks (does the uplink
exist, does the subnet overlap a route) belong to the compiler, which is given a host snapshot.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    field_validator,
    model_validator,
)

from wsnic.tags import owner_tag

DEFAULT_SUBNET = "192.168.86.0/24"
DEFAULT_BRIDGE = "wsbr0"
DEFAULT_TAP_PATTERN = "wstap%d"
DEFAULT_STATE_DIR = Path("/run/wsnic")
# The original's largest accepted WebSocket payload; jumbo frames fit.
DEFAULT_MAX_FRAME = 16384

# Linux IFNAMSIZ is 16 including the NUL; '/', ':' and whitespace are illegal, '.' and '..' too.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
_INSTANCE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,14}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _check_ifname(value: str) -> str:
    if not _IFNAME_RE.match(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a valid interface name: use 1 to 15 characters from "
            "letters, digits and _ . @ + -"
        )
    return value


def _check_tap_pattern(value: str) -> str:
    if value.count("%d") != 1:
        raise ValueError(f"{value!r} must contain %d exactly once (e.g. 'wstap%d')")
    # The kernel fills %d with up to 5 digits for thousands of clients; keep room for them.
    _check_ifname(value.replace("%d", "0"))
    if len(value.replace("%d", "")) > 10:
        raise ValueError(f"{value!r} leaves too little room for the index within 15 characters")
    return value


def _check_mac(value: str) -> str:
    lowered = value.lower()
    if not _MAC_RE.match(lowered):
        raise ValueError(f"{value!r} is not a MAC address like 02:00:00:00:00:01")
    return lowered


IfName = Annotated[str, AfterValidator(_check_ifname)]
TapPattern = Annotated[str, AfterValidator(_check_tap_pattern)]
MacAddress = Annotated[str, AfterValidator(_check_mac)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Tls(_Frozen):
    """TLS for wss://. `certificate` may hold the whole chain and the key (as the original's -r)."""

    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> Tls:
        if self.private_key is not None and self.certificate is None:
            raise ValueError("private_key is set but certificate is not; set both or neither")
        return self


class Server(_Frozen):
    address: IPvAnyAddress = Field(
        default=ipaddress.IPv4Address("127.0.0.1"),
        description="Listen address; 0.0.0.0 serves every interface",
    )
    ws_port: Port = 8086
    wss_port: Port = 8087
    tls: Tls = Tls()
    ping_interval: float = Field(
        default=30.0, gt=0, description="Seconds of silence before an idle client is pinged"
    )
    ping_timeout: float = Field(
        default=100.0, gt=0, description="Seconds of silence after which a client is dropped"
    )
    max_frame_size: int = Field(default=DEFAULT_MAX_FRAME, ge=64, le=65535)
    max_clients: int = Field(default=1024, ge=1, le=65536)
    tap_name: TapPattern = Field(default=DEFAULT_TAP_PATTERN, description="TAP name pattern")
    workers: int = Field(
        default=0, ge=0, le=64,
        description="Relay processes; 0 means one per CPU core, 1 relays in the main process",
    )
    trust_proxy: bool = Field(
        default=False, description="Log the client address from X-Forwarded-For"
    )

    @model_validator(mode="after")
    def _ports_differ(self) -> Server:
        if self.tls.certificate is not None and self.ws_port == self.wss_port:
            raise ValueError(f"ws_port and wss_port are both {self.ws_port}; they must differ")
        if self.ping_timeout <= self.ping_interval:
            raise ValueError(
                f"ping_timeout ({self.ping_timeout}) must be longer than ping_interval "
                f"({self.ping_interval})"
            )
        return self


class Nat(_Frozen):
    enabled: bool = False
    uplink: str = Field(
        default="auto",
        description="Interface towards the outside, or 'auto' for the default route's device",
    )

    @field_validator("uplink")
    @classmethod
    def _uplink_name(cls, value: str) -> str:
        return value if value == "auto" else _check_ifname(value)


class StaticLease(_Frozen):
    mac: MacAddress
    ip: ipaddress.IPv4Address
    hostname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


class Dhcp(_Frozen):
    enabled: bool = True
    lease_time: int = Field(default=86400, gt=0, description="Lease time in seconds")
    lease_file: Path | None = Field(
        default=None, description="Lease database; a temporary file removed at exit when unset"
    )
    domain_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]{1,253}$")
    name_servers: tuple[ipaddress.IPv4Address, ...] = Field(
        default=(), description="DNS servers announced by DHCP; empty means the gateway"
    )
    static_leases: tuple[StaticLease, ...] = ()


class Iperf(_Frozen):
    enabled: bool = False


class Network(_Frozen):
    name: str = Field(default="default", pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    path: str = Field(default="/", pattern=r"^/[A-Za-z0-9._~/-]*$")
    bridge: IfName = DEFAULT_BRIDGE
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_SUBNET)
    nat: Nat = Nat()
    dhcp: Dhcp = Dhcp()
    iperf: Iperf = Iperf()

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet_is_network(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                ipaddress.IPv4Network(value, strict=True)
            except ValueError as exc:
                raise ValueError(
                    f"{value!r} is not an IPv4 network in CIDR notation with its host bits zero "
                    f"(for example {DEFAULT_SUBNET}): {exc}"
                ) from None
        return value

    @field_validator("subnet")
    @classmethod
    def _subnet_has_room(cls, value: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if value.prefixlen > 29:
            raise ValueError(
                f"{value} is too small: a gateway and a DHCP pool need at least a /29"
            )
        return value

    # Derived exactly as the original: gateway = first host, pool = every other host.
    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def pool_first(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def pool_last(self) -> ipaddress.IPv4Address:
        return self.subnet.broadcast_address - 1

    @property
    def dns_servers(self) -> tuple[ipaddress.IPv4Address, ...]:
        return self.dhcp.name_servers or (self.gateway,)

    @model_validator(mode="after")
    def _static_leases_inside(self) -> Network:
        # The network and broadcast addresses are inside the subnet too, but no host can have them.
        seen_mac: set[str] = set()
        seen_ip: set[ipaddress.IPv4Address] = set()
        for lease in self.dhcp.static_leases:
            if not self.pool_first <= lease.ip <= self.pool_last:
                raise ValueError(
                    f"static lease {lease.ip} must lie in the pool {self.pool_first}-"
                    f"{self.pool_last} of {self.subnet} (not the gateway {self.gateway}, the "
                    "network or the broadcast address)"
                )
            if lease.mac in seen_mac or lease.ip in seen_ip:
                raise ValueError(
                    f"static lease {lease.mac} -> {lease.ip} repeats a MAC or an address of an "
                    "earlier lease; each must be unique"
                )
            seen_mac.add(lease.mac)
            seen_ip.add(lease.ip)
        return self


class Backends(_Frozen):
    link: Literal["iproute2", "netlink", "auto"] = "auto"
    firewall: Literal["iptables", "nftables", "auto"] = "auto"


class Profile(_Frozen):
    name: str = Field(
        default="wsnic",
        description="Instance name: tags every host object and names the journal",
    )
    server: Server = Server()
    networks: tuple[Network, ...] = Field(default=(Network(),), min_length=1)
    backends: Backends = Backends()
    state_dir: Path = DEFAULT_STATE_DIR

    @field_validator("name")
    @classmethod
    def _instance_name(cls, value: str) -> str:
        if not _INSTANCE_RE.match(value):
            raise ValueError(
                f"{value!r} is not a valid instance name: 1 to 15 characters, lower-case letters, "
                "digits, '-' and '_', starting with a letter or digit"
            )
        return value

    # A field validator (not a model validator) so the error's location is `networks`.
    @field_validator("networks")
    @classmethod
    def _networks_distinct(cls, networks: tuple[Network, ...]) -> tuple[Network, ...]:
        seen: dict[str, dict[str, str]] = {"name": {}, "path": {}, "bridge": {}}
        for net in networks:
            for attr in seen:
                value = str(getattr(net, attr))
                if value in seen[attr]:
                    raise ValueError(
                        f"networks {seen[attr][value]!r} and {net.name!r} share the {attr} "
                        f"{value!r}; each network needs its own"
                    )
                seen[attr][value] = net.name
        for i, a in enumerate(networks):
            for b in networks[i + 1 :]:
                if a.subnet.overlaps(b.subnet):
                    raise ValueError(
                        f"networks {a.name!r} ({a.subnet}) and {b.name!r} ({b.subnet}) overlap; "
                        "each network needs its own subnet"
                    )
        return networks

    def owner(self) -> str:
        """The tag carried by every host object of this instance."""
        return owner_tag(self.name)
