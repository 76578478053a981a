"""The original wsnic's flags and wsnic.conf, key for key, onto the profile."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

import pytest

from wsnic.config.loader import build_profile
from wsnic.config.models import Profile
from wsnic.config.seed import (
    SEED_BY_KEY,
    SEED_FIELDS,
    add_seed_flags,
    default_conf_path,
    flag_values,
    in_container,
    parse_seed_value,
    read_wsnic_conf,
    seed_defaults,
    seed_overrides,
)
from wsnic.errors import ConfigError

ORIGINAL_KEYS = {
    "ws_address", "ws_port", "wss_port", "wss_certificate", "wss_private_key", "enable_inet",
    "inet_iface", "subnet", "disable_dhcp", "dhcp_lease_file", "dhcp_lease_time",
    "dhcp_domain_name", "dhcp_nameserver", "enable_iperf",
}

# The original's flags: (seed key, every spelling it accepted or we add).
ORIGINAL_FLAGS = {
    "ws_address": ("-a", "--ws-address"),
    "ws_port": ("--ws-port",),
    "wss_port": ("--wss-port",),
    "wss_certificate": ("-r", "--wss-certificate"),
    "wss_private_key": ("-k", "--wss-private-key"),
    "subnet": ("-s", "--subnet"),
    "enable_inet": ("-i", "--enable-inet"),
    "inet_iface": ("-f", "--inet-iface", "---inet-iface"),
    "disable_dhcp": ("--disable-dhcp",),
    "dhcp_lease_file": ("--dhcp-lease-file",),
    "dhcp_lease_time": ("-t", "--dhcp-lease-time", "---dhcp-lease-time"),
    "dhcp_domain_name": ("-n", "--dhcp-domain-name", "---dhcp-domain-name"),
    "dhcp_nameserver": ("-d", "--dhcp-nameserver"),
    "enable_iperf": ("-p", "--enable-iperf"),
}


def expected_value(key: str, tmp: Path) -> tuple[str | None, object]:
    """(raw value for a flag or conf, expected profile value); raw None = a switch."""
    samples: dict[str, tuple[str | None, object]] = {
        "ws_address": ("0.0.0.0", ipaddress.ip_address("0.0.0.0")),
        "ws_port": ("9001", 9001),
        "wss_port": ("9002", 9002),
        "wss_certificate": ("/etc/x/c.pem", Path("/etc/x/c.pem")),
        "wss_private_key": ("/etc/x/k.pem", Path("/etc/x/k.pem")),
        "subnet": ("10.9.0.0/16", ipaddress.ip_network("10.9.0.0/16")),
        "enable_inet": (None, True),
        "inet_iface": ("eth7", "eth7"),
        "disable_dhcp": (None, False),
        "dhcp_lease_file": ("leases.db", tmp / "leases.db"),
        "dhcp_lease_time": ("600", 600),
        "dhcp_domain_name": ("lab.test", "lab.test"),
        "dhcp_nameserver": ("8.8.8.8, 8.8.4.4", (ipaddress.ip_address("8.8.8.8"),
                                                   ipaddress.ip_address("8.8.4.4"))),
        "enable_iperf": (None, True),
    }
    return samples[key]


def field_of(profile: Profile, path: tuple[str | int, ...]) -> object:
    node: object = profile
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)  # type: ignore[index]
    return node


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wsnic")
    add_seed_flags(parser)
    return parser


def build(args: list[str], tmp: Path, **kw: object) -> tuple[Profile, list[str]]:
    ns = make_parser().parse_args(args)
    kw.setdefault("container", False)
    return build_profile(None, ns, cwd=tmp, root=tmp, **kw)  # type: ignore[arg-type]


# --- the table --------------------------------------------------------------------------------

def test_seed_fields_cover_exactly_the_original_keys():
    assert {f.key for f in SEED_FIELDS} == ORIGINAL_KEYS
    assert set(ORIGINAL_FLAGS) == ORIGINAL_KEYS


@pytest.mark.parametrize("spec", SEED_FIELDS, ids=lambda f: f.key)
def test_every_profile_path_names_a_real_field(spec):
    # Walk the model classes: a typo in the table must not survive.
    model: object = Profile
    for part in spec.path:
        if isinstance(part, int):
            continue
        fields = model.model_fields  # type: ignore[attr-defined]
        assert part in fields, f"{spec.key}: {spec.field} has no {part!r}"
        annotation = fields[part].annotation
        inner = getattr(annotation, "__args__", (annotation,))[0]
        model = inner if hasattr(inner, "model_fields") else annotation
    assert spec.field.startswith(("server.", "networks[0]."))


# --- flags ------------------------------------------------------------------------------------

def test_every_flag_defaults_to_none_or_false():
    ns = make_parser().parse_args([])
    for spec in SEED_FIELDS:
        value = getattr(ns, spec.key)
        assert value is (False if spec.kind == "bool" else None), spec.key
    assert ns.wsnic_conf is None
    assert ns.verbose is False and ns.quiet is False
    assert flag_values(ns) == {}


def test_logging_and_config_flags():
    ns = make_parser().parse_args(["-v", "-q", "-c", "my.conf"])
    assert (ns.verbose, ns.quiet, ns.wsnic_conf) == (True, True, "my.conf")


def test_help_text_names_every_flag():
    text = make_parser().format_help()
    for spellings in ORIGINAL_FLAGS.values():
        for flag in spellings:
            assert flag in text
    for spec in SEED_FIELDS:
        assert len(spec.help) > 20 and spec.field in text


FLAG_CASES = [(key, flag) for key, flags in ORIGINAL_FLAGS.items() for flag in flags]


@pytest.mark.parametrize(("key", "flag"), FLAG_CASES, ids=[f"{k}:{f}" for k, f in FLAG_CASES])
def test_every_flag_spelling_sets_its_profile_field(key, flag, tmp_path):
    raw, expected = expected_value(key, tmp_path)
    argv = [flag] if raw is None else [flag, raw]
    if key == "wss_private_key":
        argv += ["-r", "/etc/x/c.pem"]  # a key alone is refused by the model
    profile, _ = build(argv, tmp_path)
    spec = SEED_BY_KEY[key]
    assert field_of(profile, spec.path) == expected


def test_triple_dash_spellings_are_plain_argparse_long_options():
    parser = make_parser()
    ns = parser.parse_args(["---inet-iface", "eth1", "---dhcp-lease-time=60",
                            "---dhcp-domain-name", "a.test"])
    assert (ns.inet_iface, ns.dhcp_lease_time, ns.dhcp_domain_name) == ("eth1", "60", "a.test")
    ns = parser.parse_args(["-feth2", "-t", "61", "-n", "b.test"])
    assert (ns.inet_iface, ns.dhcp_lease_time, ns.dhcp_domain_name) == ("eth2", "61", "b.test")


def test_a_bad_integer_flag_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"command line --ws-port: 'http' is not an integer"):
        build(["--ws-port", "http"], tmp_path)
    with pytest.raises(ConfigError, match=r"command line -t/--dhcp-lease-time"):
        build(["---dhcp-lease-time", "1h"], tmp_path)


def test_an_invalid_flag_value_names_flag_and_field(tmp_path):
    with pytest.raises(ConfigError) as info:
        build(["-s", "10.0.0.1/24"], tmp_path)
    assert info.value.problems == [
        "command line -s/--subnet: networks[0].subnet: '10.0.0.1/24' is not an IPv4 network in "
        "CIDR notation with its host bits zero (for example 192.168.86.0/24): 10.0.0.1/24 has "
        "host bits set"
    ]


def test_uplink_without_enable_inet_warns(tmp_path):
    profile, warnings = build(["-f", "eth3"], tmp_path)
    assert profile.networks[0].nat.uplink == "eth3" and not profile.networks[0].nat.enabled
    assert any("no effect without enable_inet" in w for w in warnings)
    _, warnings = build(["-i", "-f", "eth3"], tmp_path)
    assert warnings == []


# --- wsnic.conf -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SEED_FIELDS, ids=lambda f: f.key)
@pytest.mark.parametrize("via", ["positional", "-c", "default lookup"])
def test_every_conf_key_sets_its_profile_field(spec, via, tmp_path):
    raw, expected = expected_value(spec.key, tmp_path)
    lines = [f"{spec.key} = {raw if raw is not None else 'yes'}"]
    if spec.key == "wss_private_key":
        lines.append("wss_certificate=/etc/x/c.pem")
    (tmp_path / "wsnic.conf").write_text("\n".join(lines) + "\n")
    ns = make_parser().parse_args(["-c", "wsnic.conf"] if via == "-c" else [])
    positional = Path("wsnic.conf") if via == "positional" else None
    profile, warnings = build_profile(positional, ns, cwd=tmp_path, container=False, root=tmp_path)
    assert field_of(profile, spec.path) == expected
    assert warnings == [] or spec.key == "inet_iface"


def test_conf_template_of_the_original_gives_the_defaults(tmp_path):
    # Every key of the original's template with its template value: the default profile.
    template = "\n".join([
        "# comment", "ws_address=", "ws_port=8086", "wss_port=8087", "wss_certificate=",
        "wss_private_key=", "enable_inet=0", "inet_iface=", "subnet=192.168.86.0/24",
        "disable_dhcp=0", "dhcp_lease_file=", "dhcp_lease_time=86400", "dhcp_domain_name=",
        "dhcp_nameserver=", "enable_iperf=0", "",
    ])
    (tmp_path / "wsnic.conf").write_text(template)
    values, warnings = read_wsnic_conf(tmp_path / "wsnic.conf")
    assert set(values) == ORIGINAL_KEYS and warnings == []
    assert values["ws_address"] is None and values["dhcp_nameserver"] is None
    assert values["enable_inet"] is False and values["ws_port"] == 8086
    profile, _ = build_profile(Path("wsnic.conf"), None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert profile == Profile()


@pytest.mark.parametrize("raw", ["yes", "YES", "true", "True", "t", "T", "1"])
def test_true_spellings(raw, tmp_path):
    (tmp_path / "w.conf").write_text(f"enable_inet={raw}\nenable_iperf = {raw}\n")
    values, _ = read_wsnic_conf(tmp_path / "w.conf")
    assert values == {"enable_inet": True, "enable_iperf": True}


@pytest.mark.parametrize("raw", ["0", "no", "false", "off", "on", "y", "2", "enabled"])
def test_everything_else_is_false(raw, tmp_path):
    (tmp_path / "w.conf").write_text(f"disable_dhcp={raw}\n")
    values, _ = read_wsnic_conf(tmp_path / "w.conf")
    assert values == {"disable_dhcp": False}
    profile, _ = build_profile(tmp_path / "w.conf", None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert profile.networks[0].dhcp.enabled is True


@pytest.mark.parametrize("key", sorted(ORIGINAL_KEYS))
def test_empty_value_is_unset(key, tmp_path):
    (tmp_path / "w.conf").write_text(f"{key}=\n")
    values, _ = read_wsnic_conf(tmp_path / "w.conf")
    assert values == {key: None}
    assert seed_overrides(values) == {}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1.1.1.1,2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        ("1.1.1.1;2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        ("1.1.1.1:2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        ("1.1.1.1 2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        ("1.1.1.1\t2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        ("1.1.1.1 ,; :\t2.2.2.2", ["1.1.1.1", "2.2.2.2"]),
        (",1.1.1.1,,2.2.2.2,3.3.3.3;", ["1.1.1.1", "2.2.2.2", "3.3.3.3"]),
        ("9.9.9.9", ["9.9.9.9"]),
        (",;:", None),
    ],
)
def test_nameserver_splitting(raw, expected):
    assert parse_seed_value("dhcp_nameserver", raw) == expected


def test_nameserver_list_reaches_the_profile(tmp_path):
    (tmp_path / "w.conf").write_text("dhcp_nameserver = 1.1.1.1; 9.9.9.9 :8.8.8.8\n")
    profile, _ = build_profile(tmp_path / "w.conf", None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert [str(a) for a in profile.networks[0].dhcp.name_servers] == [
        "1.1.1.1", "9.9.9.9", "8.8.8.8"]


def test_unknown_key_warns_and_is_ignored(tmp_path):
    (tmp_path / "wsnic.conf").write_text("subnet=10.3.0.0/24\n\nfoo = bar\n")
    values, warnings = read_wsnic_conf(tmp_path / "wsnic.conf")
    assert values == {"subnet": "10.3.0.0/24"}
    assert warnings == [f'{tmp_path / "wsnic.conf"}:3: unknown option "foo" ignored']
    profile, warnings = build_profile(None, None, cwd=tmp_path, container=False, root=tmp_path)
    assert warnings == ['wsnic.conf:3: unknown option "foo" ignored']
    assert str(profile.networks[0].subnet) == "10.3.0.0/24"


def test_bad_integer_names_file_line_and_key(tmp_path):
    conf = tmp_path / "wsnic.conf"
    conf.write_text("# ports\nws_port = 8086\nwss_port = eighty\n")
    with pytest.raises(ConfigError) as info:
        read_wsnic_conf(conf)
    assert str(info.value) == f"{conf}:3: wss_port: 'eighty' is not an integer"


def test_duplicate_key_names_file_line_and_key(tmp_path):
    conf = tmp_path / "wsnic.conf"
    conf.write_text("subnet=10.0.0.0/24\nws_port=1\nsubnet=10.1.0.0/24\n")
    with pytest.raises(ConfigError) as info:
        read_wsnic_conf(conf)
    assert str(info.value) == f"{conf}:3: subnet: the option is given twice"


def test_unparsable_line_names_the_line(tmp_path):
    conf = tmp_path / "wsnic.conf"
    conf.write_text("ws_port=1\njust words\n")
    with pytest.raises(ConfigError) as info:
        read_wsnic_conf(conf)
    assert info.value.problems == [f"{conf}:2: cannot parse 'just words'"]


def test_invalid_conf_value_names_conf_line_and_field(tmp_path):
    (tmp_path / "wsnic.conf").write_text("ws_port=8086\n\nsubnet = 10.0.0.0/30\n")
    with pytest.raises(ConfigError) as info:
        build_profile(None, None, cwd=tmp_path, container=False, root=tmp_path)
    assert info.value.problems == [
        "wsnic.conf:3: networks[0].subnet: 10.0.0.0/30 is too small: a gateway and a DHCP pool "
        "need at least a /29"
    ]


def test_missing_conf_file_is_an_error(tmp_path):
    ns = make_parser().parse_args(["-c", "nope.conf"])
    with pytest.raises(ConfigError, match=r'"nope\.conf" not found'):
        build_profile(None, ns, cwd=tmp_path, container=False, root=tmp_path)


def test_conf_relative_paths_resolve_against_the_working_directory(tmp_path):
    (tmp_path / "w.conf").write_text("dhcp_lease_file = run/leases\nwss_certificate=c.pem\n")
    profile, _ = build_profile(tmp_path / "w.conf", None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert profile.networks[0].dhcp.lease_file == tmp_path / "run/leases"
    assert profile.server.tls.certificate == tmp_path / "c.pem"


def test_seed_overrides_table():
    assert seed_overrides({
        "subnet": "10.0.0.0/8", "disable_dhcp": True, "enable_inet": True, "inet_iface": "e0",
        "ws_port": 1, "wss_certificate": "/c", "dhcp_nameserver": ["1.1.1.1"],
        "verbose": True, "wsnic_conf": "x",
    }) == {
        "networks": {0: {"subnet": "10.0.0.0/8", "dhcp": {"enabled": False,
                                                           "name_servers": ["1.1.1.1"]},
                         "nat": {"enabled": True, "uplink": "e0"}}},
        "server": {"ws_port": 1, "tls": {"certificate": "/c"}},
    }


# --- precedence ------------------------------------------------------------------------------

def test_precedence_defaults_conf_flags(tmp_path):
    assert build([], tmp_path)[0].networks[0].subnet == ipaddress.ip_network("192.168.86.0/24")
    (tmp_path / "wsnic.conf").write_text("subnet=10.1.0.0/24\nws_port=9000\n")
    profile, _ = build([], tmp_path)
    assert str(profile.networks[0].subnet) == "10.1.0.0/24" and profile.server.ws_port == 9000
    profile, _ = build(["-s", "10.2.0.0/24"], tmp_path)
    assert str(profile.networks[0].subnet) == "10.2.0.0/24"
    assert profile.server.ws_port == 9000  # untouched by the flag


def test_precedence_yaml_then_flags(tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: lab\nserver:\n  ws_port: 7000\n  wss_port: 7001\nnetworks:\n"
        "  - name: a\n    subnet: 10.1.0.0/24\n    path: /a\n    bridge: wsbr-a\n"
        "  - name: b\n    subnet: 10.2.0.0/24\n    path: /b\n    bridge: wsbr-b\n"
    )
    (tmp_path / "wsnic.conf").write_text("subnet=10.9.0.0/24\n")  # ignored: a profile is given
    ns = make_parser().parse_args(["-s", "10.5.0.0/24", "--ws-port", "7100", "-i", "-p"])
    profile, _ = build_profile(Path("p.yaml"), ns, cwd=tmp_path, container=False, root=tmp_path)
    first, second = profile.networks
    assert str(first.subnet) == "10.5.0.0/24" and first.name == "a" and first.bridge == "wsbr-a"
    assert first.nat.enabled and first.iperf.enabled
    assert str(second.subnet) == "10.2.0.0/24" and not second.nat.enabled
    assert (profile.server.ws_port, profile.server.wss_port, profile.name) == (7100, 7001, "lab")


def test_yaml_profile_and_dash_c_together_are_refused(tmp_path):
    (tmp_path / "p.yaml").write_text("name: x\n")
    (tmp_path / "w.conf").write_text("subnet=10.1.0.0/24\n")
    ns = make_parser().parse_args(["-c", "w.conf"])
    with pytest.raises(ConfigError, match="use one of them"):
        build_profile(Path("p.yaml"), ns, cwd=tmp_path, container=False, root=tmp_path)


# --- container conventions --------------------------------------------------------------------

@pytest.mark.parametrize("marker", [".dockerenv", "run/.containerenv"])
def test_in_container_markers(marker, tmp_path):
    assert not in_container(tmp_path)
    (tmp_path / marker).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / marker).write_text("")
    assert in_container(tmp_path)


def _with_certs(home: Path) -> None:
    (home / "cert").mkdir(parents=True)
    (home / "cert" / "cert.crt").write_text("crt")
    (home / "cert" / "cert.key").write_text("key")


def test_container_defaults(tmp_path):
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    cwd.mkdir()
    (root / "run").mkdir(parents=True)
    (root / "run/.containerenv").write_text("")
    home = root / "opt/wsnic"
    _with_certs(home)
    (home / "wsnic.conf").write_text("subnet=10.44.0.0/24\n")
    (cwd / "wsnic.conf").write_text("subnet=10.55.0.0/24\n")  # not looked at in a container
    profile, _ = build_profile(None, None, cwd=cwd, root=root)  # detection from root
    assert str(profile.server.address) == "0.0.0.0"
    assert profile.server.tls.certificate == home / "cert/cert.crt"
    assert profile.server.tls.private_key == home / "cert/cert.key"
    assert str(profile.networks[0].subnet) == "10.44.0.0/24"
    assert default_conf_path(cwd=cwd, container=True, root=root) == home / "wsnic.conf"
    # A flag still wins over every default.
    ns = make_parser().parse_args(["-a", "127.0.0.2"])
    profile, _ = build_profile(None, ns, cwd=cwd, root=root)
    assert str(profile.server.address) == "127.0.0.2"


def test_non_container_defaults(tmp_path):
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir()
    _with_certs(cwd)
    _with_certs(root / "opt/wsnic")  # ignored outside a container
    (cwd / "wsnic.conf").write_text("subnet=10.55.0.0/24\n")
    profile, _ = build_profile(None, None, cwd=cwd, root=root)
    assert str(profile.server.address) == "127.0.0.1"
    assert profile.server.tls.certificate == cwd / "cert/cert.crt"
    assert profile.server.tls.private_key == cwd / "cert/cert.key"
    assert str(profile.networks[0].subnet) == "10.55.0.0/24"


def test_no_files_no_tls(tmp_path):
    assert seed_defaults(cwd=tmp_path, container=False, root=tmp_path) == {
        "ws_address": "127.0.0.1"}
    assert default_conf_path(cwd=tmp_path, container=False, root=tmp_path) is None
    profile, warnings = build([], tmp_path)
    assert profile == Profile() and warnings == []


def test_default_key_without_a_certificate_is_not_used(tmp_path):
    (tmp_path / "cert").mkdir()
    (tmp_path / "cert/cert.key").write_text("key")
    profile, _ = build([], tmp_path)
    assert profile.server.tls.certificate is None and profile.server.tls.private_key is None
    profile, _ = build(["-r", "/srv/chain.pem"], tmp_path)
    assert profile.server.tls.private_key == tmp_path / "cert/cert.key"


def test_yaml_profile_ignores_environment_defaults(tmp_path):
    (tmp_path / ".dockerenv").write_text("")
    _with_certs(tmp_path / "opt/wsnic")
    (tmp_path / "p.yaml").write_text("name: x\n")
    profile, _ = build_profile(Path("p.yaml"), None, cwd=tmp_path, root=tmp_path)
    assert str(profile.server.address) == "127.0.0.1"
    assert profile.server.tls.certificate is None
