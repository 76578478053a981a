"""dnsmasq's command line for one network (pure: no I/O).

The arguments reproduce the original wsnic's exactly, in its order; after them come the static
leases and the few options that make an instance deterministic and safe beside other dnsmasq
instances on the same host (see `_ISOLATION`).
"""

from __future__ import annotations

from pathlib import Path

from wsnic.config.models import Network

# Appended to the original's arguments; each one is needed, none changes what guests see.
_ISOLATION: tuple[str, ...] = (
    # Never read the host's /etc/dnsmasq.conf (or a conf-dir it names): only our argv counts.
    "--conf-file=/dev/null",
    # With --keep-in-foreground dnsmasq still writes /run/dnsmasq.pid, which a second instance
    # (or the host's own dnsmasq) would overwrite; an empty value disables the pidfile. wsnic
    # identifies the child by pid + start time + environment tag instead.
    "--pid-file=",
    # Log to stderr, which the process backend forwards to the "wsnic.<name>" logger, instead of
    # the host's syslog; fatal start-up errors (port in use) then reach the BackendError too.
    "--log-facility=-",
    # Stay root: dnsmasq otherwise switches to user nobody / group dip, and the kernel clears
    # PR_SET_PDEATHSIG on any uid/gid change, so the child would outlive a killed wsnic (tested
    # on dnsmasq 2.90). The lease file itself is opened before the switch either way, so the
    # unprivileged default could write it in /run/wsnic too; the death signal decides this.
    "--user=root",
    "--group=root",
)


def dnsmasq_argv(network: Network, lease_file: str) -> tuple[str, ...]:
    """The command that serves DHCP and DNS on `network`'s bridge, recording leases in
    `lease_file`."""
    dhcp = network.dhcp
    dns = ",".join(str(ip) for ip in network.dns_servers)
    argv = [
        "dnsmasq",
        "--keep-in-foreground",
        "--no-ping",
        "--no-hosts",
        f"--interface={network.bridge}",
        "--except-interface=lo",
        f"--listen-address={network.gateway}",
        "--bind-interfaces",
        f"--dhcp-range={network.pool_first},{network.pool_last},{network.subnet.netmask},"
        f"{dhcp.lease_time}s",
        f"--dhcp-option=6,{dns}",
        "--dhcp-sequential-ip",
    ]
    if dhcp.domain_name:
        argv.append(f"--domain={dhcp.domain_name}")
    argv.append(f"--dhcp-leasefile={lease_file}")
    for lease in dhcp.static_leases:
        host = f"--dhcp-host={lease.mac},{lease.ip}"
        argv.append(host if lease.hostname is None else f"{host},{lease.hostname}")
    argv.extend(_ISOLATION)
    return tuple(argv)


def default_lease_file(state_dir: Path, instance: str, network: str) -> str:
    """Where leases go when the profile names no lease file. '.' cannot occur in instance or
    network names, so the file name is unambiguous."""
    return str(state_dir / f"{instance}.{network}.leases")
