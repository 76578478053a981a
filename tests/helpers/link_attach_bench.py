"""How long attach_port takes per call, per link backend (a measurement, not a test).

    sudo PYTHONPATH=. /tmp/v/bin/python -m tests.helpers.link_attach_bench [COUNT]

Runs in a throwaway wsnt- namespace: one bridge, COUNT persistent TAPs made up front (not timed),
then one timed attach_port per TAP. The first call is reported apart (it opens the netlink
worker and looks the bridge up).
"""

from __future__ import annotations

import statistics
import sys
import time

from tests.helpers.netns import netns, sh
from wsnic.backends.iproute2 import Iproute2LinkBackend
from wsnic.backends.netlink import NetlinkLinkBackend
from wsnic.plan.steps import AddAddress, CreateBridge, SetLinkUp

OWNER = "wsnic:bench"


def measure(kind: str, count: int) -> None:
    with netns("bench") as ns:
        backend = Iproute2LinkBackend(ns) if kind == "iproute2" else NetlinkLinkBackend(ns)
        try:
            for step in (CreateBridge("wsbr0", "02:57:53:00:00:b0", OWNER),
                         AddAddress("wsbr0", "192.168.86.1/24", OWNER), SetLinkUp("wsbr0", OWNER)):
                backend.apply(step)
            batch = "".join(f"tuntap add dev wstap{i} mode tap\n" for i in range(count + 1))
            sh(["ip", "-n", ns, "-batch", "-"], input_text=batch)
            times = []
            for i in range(count + 1):
                start = time.perf_counter()
                backend.attach_port(f"wstap{i}", "wsbr0")
                times.append((time.perf_counter() - start) * 1000)
            attached = sum(1 for s in backend.links() if s.master == "wsbr0")
        finally:
            backend.close()
    first, rest = times[0], sorted(times[1:])
    print(f"{kind:9} first {first:6.2f} ms | next {count}: mean {statistics.mean(rest):5.2f} ms, "
          f"median {statistics.median(rest):5.2f} ms, max {rest[-1]:5.2f} ms "
          f"({attached} ports attached)")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    for kind in ("iproute2", "netlink"):
        measure(kind, count)


if __name__ == "__main__":
    main()
