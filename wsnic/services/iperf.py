"""iperf2's server command line for one network (pure: no I/O)."""

from __future__ import annotations

from wsnic.config.models import Network


def iperf_argv(network: Network) -> tuple[str, ...]:
    """An iperf2 server bound to the network's gateway, reporting in Mbit/s (as the original)."""
    return ("iperf", "-s", "-B", str(network.gateway), "-f", "m")
