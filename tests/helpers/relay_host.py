"""Run a RelayServer in the current network namespace until SIGTERM/SIGINT (test helper).

    ip netns exec NS python -m tests.helpers.relay_host --profile p.yaml --stats s.json
    ip netns exec NS python -m tests.helpers.relay_host --network lab:/lab:wsbr1 --ws-port 8086

attach_port runs `ip link set dev TAP master BR up`. Prints "READY" on stdout once listening.
SIGUSR1 writes counters to the --stats file (atomically); SIGTERM/SIGINT stop cleanly (exit 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from wsnic.backends._run import run
from wsnic.config.models import Profile
from wsnic.relay.server import RelayServer
from wsnic.relay.settings import RelaySettings

_REPO_ROOT = Path(__file__).resolve().parents[2]


def attach_port(tap: str, bridge: str) -> None:
    run(["ip", "link", "set", "dev", tap, "master", bridge, "up"])


def profile_from_args(args: argparse.Namespace) -> Profile:
    data: dict[str, Any] = {}
    if args.profile:
        text = Path(args.profile).read_text()
        data = json.loads(text) if args.profile.endswith(".json") else yaml.safe_load(text)
    server = dict(data.get("server", {}))
    for key in ("address", "ws_port", "wss_port", "ping_interval", "ping_timeout",
                "max_clients", "max_frame_size"):
        value = getattr(args, key)
        if value is not None:
            server[key] = value
    if args.trust_proxy:
        server["trust_proxy"] = True
    if args.cert:
        server["tls"] = {"certificate": args.cert, "private_key": args.key}
    data["server"] = server
    if args.network:
        nets = []
        for spec in args.network:
            name, path, bridge, *subnet = spec.split(":")
            net: dict[str, Any] = {"name": name, "path": path, "bridge": bridge}
            if subnet:
                net["subnet"] = subnet[0]
            nets.append(net)
        data["networks"] = nets
    return Profile.model_validate(data)


_seq = [0]


def stats_of(relay: RelayServer) -> dict[str, Any]:
    _seq[0] += 1
    return {
        "seq": _seq[0],
        "pid": os.getpid(),
        "client_count": relay.client_count,
        "connections": len(relay.connections),
        "stats": dict(relay.stats),
        "counters": relay.counters.as_dict(),
    }


def write_stats(relay: RelayServer, path: str | None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(stats_of(relay)))
    os.replace(tmp, path)


async def serve(profile: Profile, stats_path: str | None) -> None:
    relay = RelayServer(RelaySettings.from_profile(profile), attach_port)
    await relay.start()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGUSR1, write_stats, relay, stats_path)
    write_stats(relay, stats_path)
    print("READY", flush=True)
    await done.wait()
    logging.getLogger("wsnic.relay").info("signal received, stopping")
    await relay.stop()
    write_stats(relay, stats_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relay_host")
    parser.add_argument("--profile", help="profile YAML or JSON")
    parser.add_argument("--address")
    parser.add_argument("--ws-port", type=int)
    parser.add_argument("--wss-port", type=int)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--ping-interval", type=float)
    parser.add_argument("--ping-timeout", type=float)
    parser.add_argument("--max-clients", type=int)
    parser.add_argument("--max-frame-size", type=int)
    parser.add_argument("--trust-proxy", action="store_true")
    parser.add_argument("--network", action="append",
                        help="NAME:PATH:BRIDGE[:SUBNET], repeatable")
    parser.add_argument("--stats", help="file for counters (written on SIGUSR1 and at exit)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(serve(profile_from_args(args), args.stats))
    return 0



# --- test-side control of a relay_host process ------------------------------------------------

class RelayProcess:
    """A relay_host started with `ip netns exec NS`; PID, stats, fds, RSS and log."""

    def __init__(self, ns: str, proc: subprocess.Popen[str], workdir: Path) -> None:
        self.ns, self.proc, self.workdir = ns, proc, workdir
        self.stats_path = workdir / "stats.json"
        self.log_path = workdir / "relay.log"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Fresh counters: SIGUSR1, then wait for the file's sequence number to move."""
        before = json.loads(self.stats_path.read_text())["seq"]
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                data: dict[str, Any] = json.loads(self.stats_path.read_text())
                if data["seq"] > before:
                    return data
            time.sleep(0.02)
        raise TimeoutError(f"relay {self.pid} wrote no stats within {timeout} s")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError(f"no VmRSS for pid {self.pid}")


@contextlib.contextmanager
def running_relay(ns: str, args: list[str], timeout: float = 15.0) -> Iterator[RelayProcess]:
    """Start relay_host inside `ns` with `args`; stop it by PID (SIGTERM, then SIGKILL)."""
    with tempfile.TemporaryDirectory(prefix="wsnt-relay-") as tmp:
        workdir = Path(tmp)
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.helpers.relay_host",
                "--stats", str(workdir / "stats.json"), *args]
        with open(workdir / "relay.log", "w") as log:
            proc = subprocess.Popen(argv, cwd=_REPO_ROOT, stdout=subprocess.PIPE, stderr=log,
                                    text=True)
        relay = RelayProcess(ns, proc, workdir)
        try:
            _wait_ready(relay, timeout)
            yield relay
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()


def _wait_ready(relay: RelayProcess, timeout: float) -> None:
    stdout = relay.proc.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stdout], [], [], left)
        line = stdout.readline() if ready else ""
        if line.startswith("READY"):
            return
        if not line:
            break
    raise AssertionError(f"relay_host did not start (exit {relay.proc.poll()}):\n{relay.log()}")


if __name__ == "__main__":
    raise SystemExit(main())
