"""The original wsnic's configuration surface: its command-line flags and its wsnic.conf.

Both speak in the original's flat keys (`subnet`, `enable_inet`, ...). This module parses them
exactly as the original did and maps each key onto one field of the profile, always of the first
network (`networks[0]`) or of `server`. `SEED_FIELDS` is that mapping as data, for the CLI, the
README and the tests.

Container conventions (the original's Docker image) are here too: the original listens on
0.0.0.0 inside a container and picks up a certificate from a fixed place when it exists.
"""

from __future__ import annotations

import argparse
import configparser
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsnic.errors import ConfigError

Kind = Literal["str", "path", "int", "bool", "list"]
FieldPath = tuple[str | int, ...]

# The original's truthy spellings; anything else (including "0", "no", "") is false.
_TRUE_WORDS = frozenset({"yes", "true", "t", "1"})
_NAMESERVER_SPLIT = re.compile(r"[,:;\s]+")
# A key at the start of a line, as configparser reads it (`key = value` or `key: value`).
_CONF_KEY_RE = re.compile(r"^([^\s=:#;\[][^=:]*?)\s*[=:]")

CONTAINER_HOME = Path("opt/wsnic")  # the original image's WORKDIR, relative to the root


@dataclass(frozen=True)
class SeedField:
    """One key of the original: its flags, its wsnic.conf name and the profile field it sets."""

    key: str
    short: str | None
    long: str
    path: FieldPath
    kind: Kind
    help: str
    metavar: str | None = None
    # The original's triple-dash spellings, kept so old command lines keep working.
    aliases: tuple[str, ...] = ()
    # disable_dhcp=1 means dhcp.enabled=false.
    negate: bool = False

    @property
    def field(self) -> str:
        """The profile field as written in docs and errors, e.g. `networks[0].subnet`."""
        return format_field_path(self.path)

    @property
    def flags(self) -> tuple[str, ...]:
        return tuple(f for f in (self.short, self.long, *self.aliases) if f is not None)

    @property
    def flag_label(self) -> str:
        """`-s/--subnet`: how errors name the flag."""
        return "/".join(f for f in (self.short, self.long) if f is not None)


def format_field_path(path: FieldPath) -> str:
    """('networks', 1, 'subnet') -> 'networks[1].subnet'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "profile"


_NET: FieldPath = ("networks", 0)

SEED_FIELDS: tuple[SeedField, ...] = (
    SeedField(
        "ws_address", "-a", "--ws-address", ("server", "address"), "str",
        "Address the WebSocket server listens on: 127.0.0.1 when the browser runs on this "
        "machine, 0.0.0.0 to serve the network. Default: 0.0.0.0 in a container, else "
        "127.0.0.1.",
        metavar="ADDR",
    ),
    SeedField(
        "ws_port", None, "--ws-port", ("server", "ws_port"), "int",
        "TCP port of the plain WebSocket server (ws://). Default: 8086.",
        metavar="PORT",
    ),
    SeedField(
        "wss_port", None, "--wss-port", ("server", "wss_port"), "int",
        "TCP port of the WebSocket Secure server (wss://), used when a certificate is set. "
        "Default: 8087.",
        metavar="PORT",
    ),
    SeedField(
        "wss_certificate", "-r", "--wss-certificate", ("server", "tls", "certificate"), "path",
        "PEM file with the server certificate, or the whole chain including the private key; "
        "setting it enables wss://. Default: cert/cert.crt (in a container "
        "/opt/wsnic/cert/cert.crt) if that file exists.",
        metavar="CRTFILE",
    ),
    SeedField(
        "wss_private_key", "-k", "--wss-private-key", ("server", "tls", "private_key"), "path",
        "PEM file with only the certificate's private key. Default: cert/cert.key (in a "
        "container /opt/wsnic/cert/cert.key) if that file exists and a certificate is set.",
        metavar="KEYFILE",
    ),
    SeedField(
        "subnet", "-s", "--subnet", (*_NET, "subnet"), "str",
        "The network in CIDR notation, default 192.168.86.0/24. Its first host address "
        "(192.168.86.1) belongs to the bridge, which is the guests' gateway, DHCP and DNS "
        "server; every other host address forms the DHCP pool. Change it if it clashes with "
        "a network this machine is on.",
        metavar="SUBNET",
    ),
    SeedField(
        "enable_inet", "-i", "--enable-inet", (*_NET, "nat", "enabled"), "bool",
        "Give the guests access to the host's network (and the Internet) through NAT "
        "masquerading on the uplink interface.",
    ),
    SeedField(
        "inet_iface", "-f", "--inet-iface", (*_NET, "nat", "uplink"), "str",
        "The uplink interface for -i (for example eth0). Default: the device of the default "
        "route, found when the plan is made; only needed when that guess is wrong.",
        metavar="IFACE",
        aliases=("---inet-iface",),
    ),
    SeedField(
        "disable_dhcp", None, "--disable-dhcp", (*_NET, "dhcp", "enabled"), "bool",
        "Do not run dnsmasq (no DHCP and no DNS for the guests).",
        negate=True,
    ),
    SeedField(
        "dhcp_lease_file", None, "--dhcp-lease-file", (*_NET, "dhcp", "lease_file"), "path",
        "File for dnsmasq's lease database. Default: a temporary file removed at exit.",
        metavar="DBFILE",
    ),
    SeedField(
        "dhcp_lease_time", "-t", "--dhcp-lease-time", (*_NET, "dhcp", "lease_time"), "int",
        "DHCP lease time in seconds. Default: 86400 (24 hours).",
        metavar="SECONDS",
        aliases=("---dhcp-lease-time",),
    ),
    SeedField(
        "dhcp_domain_name", "-n", "--dhcp-domain-name", (*_NET, "dhcp", "domain_name"), "str",
        "Domain name announced in DHCP replies. Default: none.",
        metavar="NAME",
        aliases=("---dhcp-domain-name",),
    ),
    SeedField(
        "dhcp_nameserver", "-d", "--dhcp-nameserver", (*_NET, "dhcp", "name_servers"), "list",
        "DNS server addresses announced in DHCP replies, separated by commas, semicolons, "
        "colons or spaces, e.g. \"8.8.8.8, 8.8.4.4\". Default: the bridge address, where "
        "dnsmasq answers.",
        metavar="IPLIST",
    ),
    SeedField(
        "enable_iperf", "-p", "--enable-iperf", (*_NET, "iperf", "enabled"), "bool",
        "Run an iperf (v2) server on the bridge address for the guests.",
    ),
)

SEED_BY_KEY: dict[str, SeedField] = {f.key: f for f in SEED_FIELDS}


def add_seed_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of the original wsnic to `parser`; every default is None or False.

    A flag that was not given therefore stays None (or False for the switches), which is how
    `flag_values` tells "not given" from "given".
    """
    parser.add_argument("-v", dest="verbose", action="store_true", default=False,
                        help="Log verbose (debug) messages.")
    parser.add_argument("-q", dest="quiet", action="store_true", default=False,
                        help="Log warnings and errors only.")
    parser.add_argument("-c", dest="wsnic_conf", metavar="CFGFILE", default=None,
                        help="Read the original's wsnic.conf format from CFGFILE. Default: "
                             "wsnic.conf in the working directory (in a container "
                             "/opt/wsnic/wsnic.conf) if it exists and no profile is given.")
    for f in SEED_FIELDS:
        if f.kind == "bool":
            parser.add_argument(*f.flags, dest=f.key, action="store_true", default=False,
                                help=f.help + f" Profile: {f.field}.")
        else:
            parser.add_argument(*f.flags, dest=f.key, metavar=f.metavar, default=None,
                                help=f.help + f" Profile: {f.field}.")


def parse_seed_value(key: str, raw: str) -> object:
    """Parse a raw string as the original did; an empty value means unset (None).

    Raises ValueError for a value that is not an integer where one is needed.
    """
    spec = SEED_BY_KEY[key]
    value = raw.strip()
    if value == "":
        return None
    if spec.kind == "bool":
        return value.lower() in _TRUE_WORDS
    if spec.kind == "int":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{raw!r} is not an integer") from None
    if spec.kind == "list":
        items = [item for item in _NAMESERVER_SPLIT.split(value) if item]
        return items or None
    return value


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The seed keys the command line actually set, parsed. Switches that are off are omitted."""
    out: dict[str, object] = {}
    for f in SEED_FIELDS:
        raw = getattr(args, f.key, None)
        if raw is None or raw is False:
            continue
        if raw is True or not isinstance(raw, str):
            out[f.key] = raw
            continue
        try:
            value = parse_seed_value(f.key, raw)
        except ValueError as exc:
            raise ConfigError(f"command line {f.flag_label}: {exc}") from None
        if value is not None:
            out[f.key] = value
    return out


@dataclass
class ConfFile:
    """A parsed wsnic.conf: values of known keys, warnings, and the line of every key."""

    path: Path
    values: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)


def _key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _CONF_KEY_RE.match(line)
        if match:
            # configparser folds keys to lower case; so does the lookup.
            lines.setdefault(match.group(1).strip().lower(), number)
    return lines


def parse_wsnic_conf(path: Path, *, display: Path | None = None) -> ConfFile:
    """Read a wsnic.conf as the original did (INI without a section header, strict).

    Messages name the file as `display` (default: `path`), e.g. as the user typed it.
    """
    shown = display or path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read the configuration file: {exc.strerror}") from None
    result = ConfFile(path=path, lines=_key_lines(text))
    # The original prepends a section header; every line number configparser reports is
    # therefore one too high. No interpolation: a '%' in a path is just a '%'.
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    try:
        parser.read_string("[main]\n" + text, source=str(shown))
    except configparser.DuplicateOptionError as exc:
        raise ConfigError(
            f"{shown}:{(exc.lineno or 1) - 1}: {exc.option}: the option is given twice"
        ) from None
    except configparser.DuplicateSectionError as exc:
        raise ConfigError(
            f"{shown}:{(exc.lineno or 1) - 1}: section [{exc.section}] is given twice"
        ) from None
    except configparser.ParsingError as exc:
        # configparser counts our prepended header as line 1.
        source = text.splitlines()
        problems = [
            f"{shown}:{lineno - 1}: cannot parse {source[lineno - 2].strip()!r}"
            for lineno, _ in exc.errors
        ]
        raise ConfigError(
            f"{shown}: not in the wsnic.conf format (key = value)", problems
        ) from None
    for section in parser.sections():
        if section != "main":
            result.warnings.append(f"{shown}: section [{section}] and its options ignored")
    for key, raw in parser.items("main"):
        line = result.lines.get(key)
        where = f"{shown}:{line}" if line else str(shown)
        if key not in SEED_BY_KEY:
            result.warnings.append(f'{where}: unknown option "{key}" ignored')
            continue
        try:
            result.values[key] = parse_seed_value(key, raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: {key}: {exc}") from None
    return result


def read_wsnic_conf(path: Path) -> tuple[dict[str, object], list[str]]:
    """Known keys -> parsed values (None where the value is empty), and warnings."""
    conf = parse_wsnic_conf(path)
    return conf.values, conf.warnings


def _set_path(target: dict[str, Any], path: FieldPath, value: object) -> None:
    node: dict[Any, Any] = target
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def seed_overrides(values: Mapping[str, object], *, base: Path | None = None) -> dict[str, Any]:
    """Nested profile overrides for seed keys; None values and foreign keys are skipped.

    `networks` maps to a dict keyed by list index ({0: {...}}): the loader's merge patches
    that item of the list instead of replacing the list. Relative file names are made absolute
    against `base` when given.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        spec = SEED_BY_KEY.get(key)
        if spec is None or value is None:
            continue
        if isinstance(value, str) and spec.kind in ("int", "bool", "list"):
            value = parse_seed_value(key, value)
            if value is None:
                continue
        if spec.negate:
            value = not value
        if spec.kind == "path" and base is not None:
            value = str(base / Path(str(value)))
        if isinstance(value, tuple):
            value = list(value)
        _set_path(out, spec.path, value)
    return out


def in_container(root: Path = Path("/")) -> bool:
    """Docker creates /.dockerenv, podman /run/.containerenv."""
    return (root / ".dockerenv").is_file() or (root / "run/.containerenv").is_file()


def default_conf_path(*, cwd: Path, container: bool, root: Path = Path("/")) -> Path | None:
    """The wsnic.conf read when neither a profile nor -c is given, if it exists."""
    candidate = root / CONTAINER_HOME / "wsnic.conf" if container else cwd / "wsnic.conf"
    return candidate if candidate.is_file() else None


def seed_defaults(*, cwd: Path, container: bool, root: Path = Path("/")) -> dict[str, object]:
    """The original's environment-dependent defaults, as seed keys.

    The certificate and key are defaults only when their files exist, as in the original.
    """
    home = root / CONTAINER_HOME if container else cwd
    out: dict[str, object] = {"ws_address": "0.0.0.0" if container else "127.0.0.1"}
    certificate = home / "cert" / "cert.crt"
    key = home / "cert" / "cert.key"
    if certificate.is_file():
        out["wss_certificate"] = str(certificate.absolute())
    if key.is_file():
        out["wss_private_key"] = str(key.absolute())
    return out
