"""Real guests for relay tests: a wsnt- namespace whose eth0 is a TAP relayed over WebSocket.

    with guest(server_ns, "ws://127.0.0.1:8086/", "ga", address="192.168.86.10/24") as g:
        assert ping(g.ns, "192.168.86.1")

The connector runs as `ip netns exec SERVER_NS python -m tests.helpers.connector`, is stopped by
its PID on exit, and the guest namespace is deleted even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netns import netns, sh

REPO_ROOT = Path(__file__).resolve().parents[2]

# udhcpc calls this with the lease in its environment; busybox's default script may be absent.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-$subnet}" dev "$interface"
    if [ -n "$router" ]; then
      set -- $router
      ip route replace default via "$1" dev "$interface"
    fi
    ;;
esac
exit 0
"""


@dataclass
class Guest:
    ns: str
    tap: str
    mac: str
    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def stop_process(proc: subprocess.Popen[str], timeout: float = 5.0) -> int | None:
    """SIGTERM by PID, then SIGKILL if it does not exit in time; returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


def read_line(proc: subprocess.Popen[str], prefix: str, timeout: float) -> str:
    """The first stdout line starting with `prefix`, within `timeout` seconds."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break  # EOF: the process ended
        if line.startswith(prefix):
            return line.strip()
    raise TimeoutError(f"no {prefix!r} line from pid {proc.pid} within {timeout} s "
                       f"(exit code {proc.poll()})")


def link_exists(ns: str, name: str) -> bool:
    return sh(["ip", "link", "show", "dev", name], netns=ns, check=False).returncode == 0


def start_connector(server_ns: str, guest_ns: str, url: str, tap: str = "eth0",
                    insecure: bool = False,
                    log_path: Path | None = None) -> tuple[subprocess.Popen[str], Path]:
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="wsnt-connector-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    argv = ["ip", "netns", "exec", server_ns, sys.executable, "-m", "tests.helpers.connector",
            "--guest-ns", guest_ns, "--tap", tap, "--url", url]
    if insecure:
        argv.append("--insecure")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log,
                                text=True)
    return proc, log_path


@contextlib.contextmanager
def guest(server_ns: str, url: str, name: str = "g", *, tap: str = "eth0",
          insecure: bool = False, address: str | None = None,
          timeout: float = 15.0) -> Iterator[Guest]:
    """A guest namespace connected to the relay at `url`; its TAP is up (and addressed)."""
    with netns(name) as gns:
        # No IPv6 chatter (router solicitations, MLD): guests' traffic stays what tests send.
        sh(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1"], netns=gns)
        proc, log_path = start_connector(server_ns, gns, url, tap, insecure)
        try:
            try:
                ready = read_line(proc, "READY", timeout)
            except TimeoutError as exc:
                raise AssertionError(f"connector failed: {exc}\n{log_path.read_text()}") from None
            _, _, mac = ready.split()
            deadline = time.monotonic() + timeout
            while not link_exists(gns, tap):
                assert time.monotonic() < deadline, f"TAP {tap} never appeared in {gns}"
                time.sleep(0.05)
            sh(["ip", "link", "set", tap, "up"], netns=gns)
            if address:
                sh(["ip", "addr", "add", address, "dev", tap], netns=gns)
            yield Guest(gns, tap, mac, proc, log_path)
        finally:
            stop_process(proc)
            if proc.stdout is not None:
                proc.stdout.close()
            with contextlib.suppress(OSError):
                log_path.unlink()


def ping(ns: str, address: str, count: int = 2, deadline: int = 5) -> bool:
    """True when `address` answers from inside `ns` (bounded: count and deadline)."""
    result = sh(["busybox", "ping", "-c", str(count), "-W", "1", "-w", str(deadline), address],
                netns=ns, check=False, timeout=deadline + 5)
    return result.returncode == 0


def addresses(ns: str, dev: str) -> list[str]:
    out = sh(["ip", "-json", "addr", "show", "dev", dev], netns=ns).stdout
    return [f"{a['local']}/{a['prefixlen']}" for link in json.loads(out)
            for a in link.get("addr_info", []) if a.get("family") == "inet"]


def udhcpc(ns: str, dev: str = "eth0") -> list[str]:
    """Ask for a DHCP lease with busybox udhcpc (bounded: 5 tries 1 s apart); the addresses."""
    with tempfile.TemporaryDirectory(prefix="wsnt-udhcpc-") as tmp:
        script = Path(tmp) / "udhcpc.sh"
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o755)
        sh(["busybox", "udhcpc", "-f", "-n", "-q", "-t", "5", "-T", "1", "-i", dev,
            "-s", str(script)], netns=ns, timeout=20)
    return addresses(ns, dev)
