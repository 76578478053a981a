"""dnsmasq and iperf command lines (pure)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from wsnic.config.models import Dhcp, Network, StaticLease
from wsnic.services.dnsmasq import default_lease_file, dnsmasq_argv
from wsnic.services.iperf import iperf_argv

# What the original wsnic runs for its defaults (192.168.86.0/24 on wsbr0, 86400 s leases),
# with its temporary lease file replaced by ours.
ORIGINAL_DEFAULT = [
    "dnsmasq",
    "--keep-in-foreground",
    "--no-ping",
    "--no-hosts",
    "--interface=wsbr0",
    "--except-interface=lo",
    "--listen-address=192.168.86.1",
    "--bind-interfaces",
    "--dhcp-range=192.168.86.2,192.168.86.254,255.255.255.0,86400s",
    "--dhcp-option=6,192.168.86.1",
    "--dhcp-sequential-ip",
    "--dhcp-leasefile=/run/wsnic/wsnic.default.leases",
]
ISOLATION = [
    "--conf-file=/dev/null",
    "--pid-file=",
    "--log-facility=-",
    "--user=root",
    "--group=root",
]


def test_default_network_is_the_originals_command_plus_isolation():
    lease = default_lease_file(Path("/run/wsnic"), "wsnic", "default")
    argv = dnsmasq_argv(Network(), lease)
    assert isinstance(argv, tuple)
    assert list(argv) == ORIGINAL_DEFAULT + ISOLATION


def test_default_lease_file_is_in_the_state_dir_and_unambiguous():
    assert default_lease_file(Path("/run/wsnic"), "lab", "net1") == "/run/wsnic/lab.net1.leases"
    a = default_lease_file(Path("/s"), "a-b", "c")
    b = default_lease_file(Path("/s"), "a", "b-c")
    assert a != b


def test_domain_comes_before_the_lease_file_as_in_the_original():
    net = Network(dhcp=Dhcp(domain_name="lab.example"))
    argv = list(dnsmasq_argv(net, "/var/lib/wsnic/leases"))
    i = argv.index("--domain=lab.example")
    assert argv[i + 1] == "--dhcp-leasefile=/var/lib/wsnic/leases"
    assert argv[:i] == ORIGINAL_DEFAULT[:-1]


def test_name_servers_are_announced_in_order():
    net = Network(dhcp=Dhcp(name_servers=(ipaddress.IPv4Address("9.9.9.9"),
                                          ipaddress.IPv4Address("1.1.1.1"))))
    argv = dnsmasq_argv(net, "/x")
    assert "--dhcp-option=6,9.9.9.9,1.1.1.1" in argv
    assert not any(a.startswith("--dhcp-option=6,192.168.86.1") for a in argv)


def test_other_subnet_lease_time_and_bridge():
    net = Network(
        bridge="br-lab",
        subnet=ipaddress.IPv4Network("10.20.0.0/16"),
        dhcp=Dhcp(lease_time=600),
    )
    argv = dnsmasq_argv(net, "/x")
    assert "--interface=br-lab" in argv
    assert "--listen-address=10.20.0.1" in argv
    assert "--dhcp-range=10.20.0.2,10.20.255.254,255.255.0.0,600s" in argv
    assert "--dhcp-option=6,10.20.0.1" in argv


def test_static_leases_with_and_without_hostname():
    net = Network(dhcp=Dhcp(static_leases=(
        StaticLease(mac="02:00:00:00:00:0A", ip=ipaddress.IPv4Address("192.168.86.10")),
        StaticLease(mac="02:00:00:00:00:0b", ip=ipaddress.IPv4Address("192.168.86.11"),
                    hostname="guest11"),
    )))
    argv = list(dnsmasq_argv(net, "/x"))
    hosts = [a for a in argv if a.startswith("--dhcp-host=")]
    assert hosts == [
        "--dhcp-host=02:00:00:00:00:0a,192.168.86.10",
        "--dhcp-host=02:00:00:00:00:0b,192.168.86.11,guest11",
    ]
    # Static leases follow the original's arguments; the isolation options close the line.
    assert argv.index(hosts[0]) > argv.index("--dhcp-leasefile=/x")
    assert argv[-len(ISOLATION):] == ISOLATION


def test_iperf_is_the_originals_server_on_the_gateway():
    assert iperf_argv(Network()) == ("iperf", "-s", "-B", "192.168.86.1", "-f", "m")
    other = Network(subnet=ipaddress.IPv4Network("10.1.2.0/24"))
    assert iperf_argv(other) == ("iperf", "-s", "-B", "10.1.2.1", "-f", "m")
