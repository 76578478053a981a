"""YAML profiles: errors name file, line and field; merging; paths; random valid profiles."""

from __future__ import annotations

import ipaddress
import re
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from wsnic.config.loader import build_profile, deep_merge, detect_format, load_profile_file
from wsnic.config.models import Profile
from wsnic.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "profiles"


def write(tmp: Path, text: str, name: str = "lab.yaml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_profile_file(path)
    assert str(path) in str(info.value).splitlines()[0]
    return info.value.problems


TWO_NETS = """
name: lab
networks:
  - name: a
    path: /a
    bridge: wsbr-a
    subnet: 10.0.0.0/24
  - name: b
    path: /b
    bridge: {bridge_b}
    subnet: {subnet_b}
"""

# (case id, YAML text, line, field, words that say what is valid)
ERROR_CASES = [
    ("subnet-host-bits", "networks:\n  - subnet: 10.0.0.1/24\n", 2, "networks[0].subnet",
     "'10.0.0.1/24' is not an IPv4 network in CIDR notation with its host bits zero"),
    ("subnet-too-small", "name: x\nnetworks:\n  - name: a\n    subnet: 10.0.0.0/30\n", 4,
     "networks[0].subnet", "need at least a /29"),
    ("ifname-too-long", "networks:\n  - bridge: wsbr-much-too-long\n", 2, "networks[0].bridge",
     "use 1 to 15 characters"),
    ("bad-port", "server:\n  address: 0.0.0.0\n  ws_port: 70000\n", 3, "server.ws_port",
     "less than or equal to 65535, got 70000"),
    ("zero-port", "server:\n  wss_port: 0\n", 2, "server.wss_port",
     "greater than or equal to 1, got 0"),
    ("overlap", TWO_NETS.format(bridge_b="wsbr-b", subnet_b="10.0.0.128/25"), 2, "networks",
     "networks 'a' (10.0.0.0/24) and 'b' (10.0.0.128/25) overlap; each network needs its own"),
    ("shared-bridge", TWO_NETS.format(bridge_b="wsbr-a", subnet_b="10.1.0.0/24"), 2, "networks",
     "share the bridge 'wsbr-a'; each network needs its own"),
    ("lease-time-zero", "networks:\n  - dhcp:\n      enabled: true\n      lease_time: 0\n", 4,
     "networks[0].dhcp.lease_time", "greater than 0, got 0"),
    ("lease-time-negative", "networks:\n  - dhcp: {lease_time: -5}\n", 2,
     "networks[0].dhcp.lease_time", "greater than 0, got -5"),
    ("unknown-key", "server:\n  ws_port: 1\n  colour: red\n", 3, "server.colour",
     "unknown key 'colour'; valid keys here: address, ws_port, wss_port, tls"),
    ("unknown-top-key", "name: x\nnetwork: []\n", 2, "network",
     "unknown key 'network'; valid keys here: name, server, networks, backends, state_dir"),
    ("instance-name", "# lab\nname: My Lab\n", 2, "name",
     "'My Lab' is not a valid instance name: 1 to 15 characters, lower-case letters"),
    ("bad-mac", "networks:\n  - dhcp:\n      static_leases:\n        - ip: 192.168.86.9\n"
     "          mac: 02:00:00:00:00:zz\n", 5, "networks[0].dhcp.static_leases[0].mac",
     "'02:00:00:00:00:zz' is not a MAC address like 02:00:00:00:00:01"),
    ("lease-outside", "networks:\n  - subnet: 10.5.0.0/24\n    dhcp:\n      static_leases:\n"
     "        - {mac: '02:00:00:00:00:01', ip: 10.6.0.9}\n", 2, "networks[0]",
     "static lease 10.6.0.9 must lie in the pool 10.5.0.2-10.5.0.254 of 10.5.0.0/24"),
    ("lease-broadcast", "networks:\n  - subnet: 10.5.0.0/24\n    dhcp:\n      static_leases:\n"
     "        - {mac: '02:00:00:00:00:01', ip: 10.5.0.255}\n", 2, "networks[0]",
     "static lease 10.5.0.255 must lie in the pool"),
    ("bad-nameserver", "networks:\n  - dhcp:\n      name_servers: [1.1.1.1, dns.google]\n", 3,
     "networks[0].dhcp.name_servers[1]", "valid IPv4 address, got 'dns.google'"),
    ("bad-backend", "backends:\n  firewall: pf\n", 2, "backends.firewall",
     "Input should be 'iptables', 'nftables' or 'auto', got 'pf'"),
    ("key-without-cert", "server:\n  tls:\n    private_key: k.pem\n", 2, "server.tls",
     "private_key is set but certificate is not"),
]


@pytest.mark.parametrize(("text", "line", "field", "words"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_each_validation_error_names_file_line_field_and_what_is_valid(
        text, line, field, words, tmp_path):
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    prefix = f"{path}:{line}: {field}: "
    assert problems[0].startswith(prefix), problems[0]
    assert words in problems[0]


def test_all_problems_at_once_without_derived_ones(tmp_path):
    path = write(tmp_path, """
        name: lab
        server:
          ws_port: 70000
        networks:
          - name: a
            path: /a
            bridge: wsbr-a
            subnet: 10.0.0.1/24
            dhcp:
              lease_time: 0
          - name: b
            path: /b
            bridge: wsbr-b-is-too-long
            subnet: 10.1.0.0/30
            foo: 1
        """)
    problems = problems_of(path)
    assert [p.split(": ")[0:2] for p in problems] == [
        [f"{path}:3", "server.ws_port"],
        [f"{path}:8", "networks[0].subnet"],
        [f"{path}:10", "networks[0].dhcp.lease_time"],
        [f"{path}:13", "networks[1].bridge"],
        [f"{path}:14", "networks[1].subnet"],
        [f"{path}:15", "networks[1].foo"],
    ]
    assert not any("too_short" in p or "at least 1 item" in p for p in problems)


def test_empty_networks_is_still_reported(tmp_path):
    # too_short is dropped only when an item failed; an empty list is a real problem.
    problems = problems_of(write(tmp_path, "networks: []\n"))
    assert problems == [f"{tmp_path / 'lab.yaml'}:1: networks: Tuple should have at least 1 "
                        "item after validation, not 0, got []"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "name: lab\nserver:\n  ws_port: [8086\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: YAML syntax error: .*"):
        load_profile_file(path)
    path = write(tmp_path, "name: lab\n  bad: indent\n", "b.yaml")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:2: YAML syntax error"):
        load_profile_file(path)


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, "name: a\nserver: {}\nname: b\n")
    with pytest.raises(ConfigError,
                       match=rf"^{re.escape(str(path))}:3: .*duplicate key 'name' .*line 1"):
        load_profile_file(path)


def test_profile_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="a profile is a mapping of keys"):
        load_profile_file(write(tmp_path, "- a\n- b\n"))


def test_missing_profile(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: profile not found"):
        load_profile_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="profile not found"):
        build_profile(Path("nope.yaml"), None, cwd=tmp_path, container=False, root=tmp_path)


def test_empty_profile_is_the_default(tmp_path):
    assert load_profile_file(write(tmp_path, "# nothing\n")) == Profile()


def test_all_digit_mac_is_a_string_not_base_60(tmp_path):
    # YAML 1.1 would read 12:34:56:00:00:01 as the integer 163180261201.
    profile = load_profile_file(write(tmp_path, """
        networks:
          - dhcp:
              static_leases:
                - mac: 12:34:56:00:00:01
                  ip: 192.168.86.10
        """))
    assert profile.networks[0].dhcp.static_leases[0].mac == "12:34:56:00:00:01"


def test_relative_paths_resolve_against_the_profile_folder(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    write(folder, """
        server:
          tls:
            certificate: ../cert/c.pem
            private_key: /abs/k.pem
        networks:
          - dhcp:
              lease_file: leases/a.db
        state_dir: state
        """)
    # Given relative to a working directory that is not the profile's folder.
    profile, _ = build_profile(Path("profiles/lab.yaml"), None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert profile.server.tls.certificate == folder / "../cert/c.pem"
    assert profile.server.tls.private_key == Path("/abs/k.pem")
    assert profile.networks[0].dhcp.lease_file == folder / "leases/a.db"
    assert profile.state_dir == folder / "state"
    assert profile == load_profile_file(folder / "lab.yaml")


def test_flag_error_on_a_yaml_profile_names_the_flag(tmp_path):
    import argparse

    from wsnic.config.seed import add_seed_flags

    parser = argparse.ArgumentParser()
    add_seed_flags(parser)
    write(tmp_path, "name: lab\nnetworks:\n  - bridge: wsbr-x\n    dhcp: {lease_time: 0}\n")
    ns = parser.parse_args(["-d", "1.1.1.1,nope"])
    with pytest.raises(ConfigError) as info:
        build_profile(Path("lab.yaml"), ns, cwd=tmp_path, container=False, root=tmp_path)
    assert info.value.problems == [
        "lab.yaml:4: networks[0].dhcp.lease_time: Input should be greater than 0, got 0",
        "command line -d/--dhcp-nameserver: networks[0].dhcp.name_servers[1]: Input is not a "
        "valid IPv4 address, got 'nope'",
    ]


def test_deep_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "n": [{"x": 1, "y": 2}, {"x": 3}]}
    over = {"a": {"c": [9]}, "n": {0: {"y": 5}}, "z": {"k": 1}}
    assert deep_merge(base, over) == {
        "a": {"b": 1, "c": [9]}, "n": [{"x": 1, "y": 5}, {"x": 3}], "z": {"k": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "n": [{"x": 1, "y": 2}, {"x": 3}]}
    assert deep_merge({}, {"n": {0: {"y": 1}}}) == {"n": [{"y": 1}]}
    # A base of the wrong shape stays, so validation reports it where the file wrote it.
    assert deep_merge({"n": "oops"}, {"n": {0: {"y": 1}}}) == {"n": "oops"}
    assert deep_merge({"s": 5}, {"s": {"a": 1}}) == {"s": 5}


def test_detect_format(tmp_path):
    assert detect_format(Path("x.yaml")) == "yaml"
    assert detect_format(Path("x.YML")) == "yaml"
    assert detect_format(Path("wsnic.conf")) == "conf"
    (tmp_path / "a").write_text("# c\nsubnet = 10.0.0.0/24\n")
    (tmp_path / "b").write_text("name: lab\nserver:\n  ws_port: 1\n")
    assert detect_format(tmp_path / "a") == "conf"
    assert detect_format(tmp_path / "b") == "yaml"
    # A sniffed conf is read as one.
    profile, _ = build_profile(tmp_path / "a", None, cwd=tmp_path, container=False,
                               root=tmp_path)
    assert str(profile.networks[0].subnet) == "10.0.0.0/24"


def test_every_shipped_profile_validates():
    files = sorted([*PROFILES.glob("*.yaml"), *PROFILES.glob("*.yml")])
    assert files, f"no profiles in {PROFILES}: profiles/default.yaml and lab.yaml are expected"
    failures = []
    for path in files:
        try:
            load_profile_file(path)
        except ConfigError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


# --- random valid profiles ----------------------------------------------------------------------

_NAME = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,14}", fullmatch=True)
_IFNAME = st.from_regex(r"[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]{0,14}", fullmatch=True)


@st.composite
def networks(draw: st.DrawFn) -> list[dict[str, object]]:
    count = draw(st.integers(1, 3))
    # Distinct first octets and prefixes of at least /8 can never overlap.
    octets = draw(st.lists(st.integers(1, 223), min_size=count, max_size=count, unique=True))
    names = draw(st.lists(_NAME, min_size=count, max_size=count, unique=True))
    bridges = draw(st.lists(_IFNAME.filter(lambda n: n not in (".", "..")), min_size=count,
                            max_size=count, unique=True))
    out: list[dict[str, object]] = []
    for i in range(count):
        prefix = draw(st.integers(8, 29))
        bits = draw(st.integers(0, (1 << 24) - 1))
        net = ipaddress.IPv4Network(((octets[i] << 24) | bits, prefix), strict=False)
        pool = list(range(2, min(net.num_addresses - 1, 40)))
        offsets = draw(st.lists(st.sampled_from(pool), max_size=3, unique=True))
        leases = [
            {"mac": f"02:00:00:00:{i:02x}:{j:02x}", "ip": str(net.network_address + off)}
            for j, off in enumerate(offsets)
        ]
        out.append({
            "name": names[i],
            "path": "/" if i == 0 else f"/net{i}",
            "bridge": bridges[i],
            "subnet": str(net),
            "nat": {"enabled": draw(st.booleans()),
                    "uplink": draw(st.one_of(st.just("auto"), _IFNAME))},
            "dhcp": {
                "enabled": draw(st.booleans()),
                "lease_time": draw(st.integers(1, 10**7)),
                "domain_name": draw(st.one_of(st.none(), st.from_regex(
                    r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,2}", fullmatch=True))),
                "name_servers": [str(ipaddress.IPv4Address(a)) for a in draw(
                    st.lists(st.integers(1, 2**32 - 2), max_size=3))],
                "static_leases": leases,
                "lease_file": draw(st.one_of(st.none(), st.just("/var/lib/wsnic/leases"))),
            },
            "iperf": {"enabled": draw(st.booleans())},
        })
    return out


@st.composite
def profiles(draw: st.DrawFn) -> dict[str, object]:
    ws_port = draw(st.integers(1, 65535))
    wss_port = draw(st.integers(1, 65535).filter(lambda p: p != ws_port))
    tls = draw(st.sampled_from([{}, {"certificate": "/c.pem"},
                                {"certificate": "/c.pem", "private_key": "/k.pem"}]))
    interval = draw(st.floats(0.5, 100))
    return {
        "name": draw(_NAME),
        "server": {
            "address": draw(st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "10.1.2.3"])),
            "ws_port": ws_port,
            "wss_port": wss_port,
            "tls": tls,
            "ping_interval": interval,
            "ping_timeout": interval + draw(st.floats(0.5, 100)),
            "max_frame_size": draw(st.integers(64, 65535)),
            "max_clients": draw(st.integers(1, 65536)),
            "trust_proxy": draw(st.booleans()),
        },
        "networks": draw(networks()),
        "backends": {"link": draw(st.sampled_from(["iproute2", "netlink", "auto"])),
                     "firewall": draw(st.sampled_from(["iptables", "nftables", "auto"]))},
    }


@settings(max_examples=150, deadline=None)
@given(profiles())
def test_random_valid_profiles_validate_and_round_trip(data):
    profile = Profile.model_validate(data)
    dumped = profile.model_dump(mode="json")
    assert Profile.model_validate(dumped) == profile
    # And through a YAML file, the way users write them.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(yaml.safe_dump(dumped, sort_keys=False))
        assert load_profile_file(path) == profile
