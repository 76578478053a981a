"""Processes and namespaces for the benchmarks: throwaway `wsnt-bench-*` namespaces, the server
under test inside one, and its CPU, RSS and PSS read from /proc. Everything started here is stopped
by PID; a namespace is deleted after the processes inside it (all started by the bench) are killed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NS_PREFIX = "wsnt-bench-"
WS_PORT = 8086
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SAMPLE_S = 0.1  # CPU/RSS sampling period
# PSS sampling period: a PSS read takes the server's memory-map locks and walks its page
# tables; every 100 ms it cost relay60 about 10 % of its frames/s. Memory moves slowly.
PSS_EVERY_S = 1.0


class BenchError(Exception):
    """A run that could not be measured (its row records the reason and goes on)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- namespaces and processes ----------------------------------------------------------------


def run(argv: Sequence[str], timeout: float = 30, check: bool = True,
        ns: str | None = None) -> subprocess.CompletedProcess[str]:
    full = list(argv) if ns is None else ["ip", "netns", "exec", ns, *argv]
    try:
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout,
                              check=check)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"{shlex.join(full)} failed ({exc.returncode}): "
                         f"{(exc.stderr or exc.stdout).strip()[-300:]}") from None
    except subprocess.TimeoutExpired:
        raise BenchError(f"{shlex.join(full)} did not finish within {timeout} s") from None


def stop_pid(proc: subprocess.Popen[Any], signals: Sequence[tuple[int, float]]) -> None:
    """Send each signal in turn to this one PID until it exits within the signal's grace."""
    for signum, grace in signals:
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Namespaces:
    """Every namespace this run created; each is deleted (its processes killed by PID first)."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    def create(self, tag: str) -> str:
        name = f"{NS_PREFIX}{tag}-{uuid.uuid4().hex[:6]}"
        run(["ip", "netns", "add", name])
        self.live.add(name)
        run(["ip", "link", "set", "lo", "up"], ns=name)
        return name

    def delete(self, name: str) -> None:
        # Only processes inside a namespace this run created: the server, its children, ours.
        for _ in range(3):
            out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            pids = [int(p) for p in out.stdout.split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.live.discard(name)

    def delete_all(self) -> None:
        for name in list(self.live):
            self.delete(name)

    @contextlib.contextmanager
    def scoped(self, tag: str) -> Iterator[str]:
        name = self.create(tag)
        try:
            yield name
        finally:
            self.delete(name)


# --- /proc readings ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime ticks, rss KB) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]) * PAGE_KB


def _pss(pid: int) -> int | None:
    """Proportional set size of a process in KB (`Pss:` of smaps_rollup), None when it is gone
    (or has no memory left: a zombie, whose read fails with ESRCH)."""
    try:
        raw = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in raw.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def descendants(root: int) -> list[int]:
    """root and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def listening(pid: int, port: int) -> bool:
    """A TCP socket in LISTEN on `port`, in the network namespace of `pid`."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                return True
    return False


def link_count(pid: int) -> int:
    """Network interfaces in the namespace of `pid` (TAPs of clients included)."""
    try:
        return len(Path(f"/proc/{pid}/net/dev").read_text().splitlines()) - 2
    except OSError:
        return -1


class Monitor:
    """Samples the server's process tree: CPU ticks per window, RSS (peak) every 100 ms, and PSS
    (peak) every second (smaps_rollup walks every mapping of a process, stat does not).

    RSS sums each process's resident pages, so pages shared by several processes of the tree
    (libpython, libc, ...) count once per process; PSS divides each shared page among the
    processes that map it, so the tree's PSS sum is the memory the tree really uses.

    Above `rss_limit_kb` (RSS) the server is killed (by PID) so that a runaway cannot take the
    machine.
    """

    def __init__(self, proc: subprocess.Popen[Any], rss_limit_kb: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.rss_limit_kb = rss_limit_kb
        self.tree = [self.pid]
        self.rss_kb = 0
        self.rss_main_kb = 0
        self.peak_kb = 0
        self.pss_kb = 0
        self.pss_peak_kb = 0
        self.pss_read_max_s = 0.0  # CPU time of the costliest PSS read of the whole tree
        self.pss_every_s = PSS_EVERY_S
        self._pss_at = 0.0  # monotonic time of the last PSS read
        self.limit_hit = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._window: tuple[float, dict[int, int]] | None = None
        self._start_kb = 0
        self._pss_start_kb = 0
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(SAMPLE_S):
            if n % 10 == 0:  # the tree changes rarely (dnsmasq, iperf): rescan once a second
                self.tree = descendants(self.pid)
            n += 1
            self.sample()

    def sample(self, force_pss: bool = False) -> tuple[int, int]:
        """(RSS, PSS) of the tree in KB; PSS is read again when it is due or `force_pss`, else
        it is the last one read."""
        total = 0
        main = 0
        tree = self.tree
        for pid in tree:
            st = _stat(pid)
            if st is not None:
                total += st[2]
                if pid == self.pid:
                    main = st[2]
        pss: int | None = None
        took = 0.0
        now = time.monotonic()
        if force_pss or now - self._pss_at >= self.pss_every_s - SAMPLE_S / 2:
            self._pss_at = now
            cpu0 = time.thread_time()
            pss = sum(p for pid in tree if (p := _pss(pid)) is not None)
            took = time.thread_time() - cpu0
        with self._lock:
            self.rss_kb, self.rss_main_kb = total, main
            self.peak_kb = max(self.peak_kb, total)
            if pss is not None:
                self.pss_kb = pss
                self.pss_peak_kb = max(self.pss_peak_kb, pss)
                self.pss_read_max_s = max(self.pss_read_max_s, took)
            pss = self.pss_kb
        if total > self.rss_limit_kb and not self.limit_hit and self.proc.poll() is None:
            self.limit_hit = True
            log(f"  server RSS {total // 1024} MB is over --rss-limit-mb: killing pid {self.pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        return total, pss

    def ticks(self) -> dict[int, int]:
        out = {}
        for pid in self.tree:
            st = _stat(pid)
            if st is not None:
                out[pid] = st[1]
        return out

    def begin(self) -> None:
        self.tree = descendants(self.pid)
        with self._lock:
            self.pss_read_max_s = 0.0
        rss, pss = self.sample(force_pss=True)
        with self._lock:
            self.peak_kb = self._start_kb = rss
            self.pss_peak_kb = self._pss_start_kb = pss
        self._window = (time.monotonic(), self.ticks())

    def end(self) -> dict[str, Any]:
        assert self._window is not None
        start, before = self._window
        after = self.ticks()
        wall = max(time.monotonic() - start, 1e-6)
        tree = sum(t - before.get(pid, 0) for pid, t in after.items())
        main = after.get(self.pid, before.get(self.pid, 0)) - before.get(self.pid, 0)
        self.sample(force_pss=True)
        with self._lock:
            return {
                "cpu_pct": round(100.0 * tree / CLK_TCK / wall, 1),
                "cpu_main_pct": round(100.0 * main / CLK_TCK / wall, 1),
                "rss_start_kb": self._start_kb,
                "rss_peak_kb": self.peak_kb,
                "rss_end_kb": self.rss_kb,
                "rss_main_end_kb": self.rss_main_kb,
                "pss_start_kb": self._pss_start_kb,
                "pss_peak_kb": self.pss_peak_kb,
                "pss_end_kb": self.pss_kb,
                "pss_every_ms": round(self.pss_every_s * 1000),
                "pss_read_cpu_max_ms": round(self.pss_read_max_s * 1000, 2),
                "wall_s": round(wall, 3),
                "rss_limit_hit": self.limit_hit,
            }

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


# --- the server under test -------------------------------------------------------------------


@dataclass
class ServerSpec:
    argv: list[str]
    cwd: Path
    ready_timeout: float = 60.0


class Server:
    def __init__(self, spec: ServerSpec, ns: str, log_path: Path, rss_limit_kb: int) -> None:
        self.ns = ns
        self.log_path = log_path
        with open(log_path, "w") as out:
            # Own session: a Ctrl-C on the terminal reaches the runner only, which then stops
            # the server itself, in order.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, *spec.argv], cwd=spec.cwd, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.pid = self.proc.pid
        deadline = time.monotonic() + spec.ready_timeout
        while not listening(self.pid, WS_PORT):  # readiness = the port, not a log line
            if self.proc.poll() is not None:
                raise BenchError(f"server exited ({self.proc.returncode}) before listening:\n"
                                 + self.tail())
            if time.monotonic() > deadline:
                self.stop()
                raise BenchError(f"server not listening on {WS_PORT} within "
                                 f"{spec.ready_timeout} s:\n" + self.tail())
            time.sleep(0.05)
        self.monitor = Monitor(self.proc, rss_limit_kb)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> float:
        """SIGINT (the original only handles KeyboardInterrupt), then SIGTERM, then SIGKILL."""
        t0 = time.monotonic()
        if hasattr(self, "monitor"):
            self.monitor.close()
        stop_pid(self.proc, [(signal.SIGINT, 10.0), (signal.SIGTERM, 5.0)])
        return time.monotonic() - t0
