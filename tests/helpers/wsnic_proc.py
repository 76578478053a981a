"""Run the real `wsnic` command inside a test namespace and talk to it like a user would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.helpers.netns import settle, sh

REPO = Path(__file__).resolve().parents[2]


def wsnic_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "wsnic", *args]


def run_wsnic(ns: str, args: Sequence[str], timeout: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a wsnic command to completion inside `ns`."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, *wsnic_argv(args)],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )


class WsnicProcess:
    """A long-running `wsnic apply` whose output is collected line by line on a thread."""

    def __init__(self, ns: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *wsnic_argv(args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for(self, needle: str, timeout: float = 30, start: int = 0) -> str:
        """Wait until an output line (from index `start` on) contains `needle`."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines[start:]:
                    if needle in line:
                        return line
                if not self._reader.is_alive():
                    raise AssertionError(
                        f"wsnic exited ({self.proc.poll()}) before {needle!r}:\n" + self.output()
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {needle!r} within {timeout} s:\n" + self.output())
                self._new_line.wait(min(remaining, 0.5))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 30) -> int:
        """Wait for exit and for the last of its output."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def wsnic_running(ns: str, args: Sequence[str], ready: str = "serving",
                  env: dict[str, str] | None = None) -> Iterator[WsnicProcess]:
    proc = WsnicProcess(ns, args, env)
    try:
        proc.wait_for(ready)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.signal(signal.SIGTERM)
            try:
                proc.finish(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def uplink_namespace(ns: str, upstream: str) -> None:
    """Give `ns` an uplink `wsup0` (10.99.0.1/30) to `upstream` (10.99.0.2/30) and a default
    route through it, as a host's Internet link would be."""
    sh(["ip", "link", "add", "wsup0", "type", "veth", "peer", "name", "eth0", "netns", upstream],
       netns=ns)
    sh(["ip", "addr", "add", "10.99.0.1/30", "dev", "wsup0"], netns=ns)
    sh(["ip", "link", "set", "wsup0", "up"], netns=ns)
    sh(["ip", "route", "add", "default", "via", "10.99.0.2"], netns=ns)
    sh(["ip", "addr", "add", "10.99.0.2/30", "dev", "eth0"], netns=upstream)
    sh(["ip", "link", "set", "eth0", "up"], netns=upstream)
    settle(ns)
    settle(upstream)
