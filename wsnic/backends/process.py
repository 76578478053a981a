"""Supervised child processes (dnsmasq, iperf): StartProcess / StopProcess.

Identity. A child is recognised by three things, never by its pid alone: the pid, its start time
(field 22 of /proc/PID/stat, clock ticks since boot; a reused pid has another one) and the tag in
its environment, `WSNIC_OWNER=<owner>` and `WSNIC_CHILD=<name>`, read back from
/proc/PID/environ. The tag also lets `sweep` and a journal-less stop find survivors.

Death with wsnic. Every child is spawned with PR_SET_PDEATHSIG(SIGTERM), so the kernel stops it
even when wsnic is killed with SIGKILL. The signal fires when the *thread* that forked the child
exits, not when the process does: call `apply(StartProcess)` from the main thread or another
thread that lives as long as wsnic (never from a short-lived worker such as `call_in_netns`'s).
The setting is also cleared when the child changes its uid or gid, which is why dnsmasq is told
to stay root (see wsnic.services.dnsmasq).

Namespaces. With `netns` set, the child is started through `ip netns exec`, which enters the
namespace and execs the command in place: the pid we hold stays the child's. Scans then only
consider processes inside that namespace.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from wsnic.backends._netns import NETNS_DIR
from wsnic.backends._run import in_netns, render
from wsnic.errors import BackendError
from wsnic.plan.observed import ProcessState
from wsnic.plan.steps import StartProcess, Step, StopProcess

log = logging.getLogger("wsnic.process")

ENV_OWNER = "WSNIC_OWNER"
ENV_CHILD = "WSNIC_CHILD"

_PR_SET_PDEATHSIG = 1
# Resolved once in the parent: the pre-exec hook runs between fork and exec, where loading a
# library or looking up a symbol could deadlock on a lock another thread held at fork time.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_TAIL_LINES = 20


def _death_signal_hook(parent: int) -> Callable[[], None]:
    """The pre-exec hook: die with our forking thread; exit at once if wsnic already died
    between fork and here (the death signal would never come)."""

    def hook() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(126)
        if os.getppid() != parent:
            os._exit(125)

    return hook


# --- /proc ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    start_time: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) is in parentheses and may itself contain spaces and ')': split after the
    # last ')'. What follows starts with field 3 (state), so field N is rest[N - 3].
    rest = data[data.rindex(b")") + 2 :].split()
    return _Stat(state=rest[0].decode(), ppid=int(rest[1]), start_time=int(rest[19]))


def start_time_of(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot); None if no such pid."""
    stat = _read_stat(pid)
    return None if stat is None else stat.start_time


def _tags(pid: int) -> tuple[str | None, str | None]:
    """(owner, name) from the process's environment; (None, None) when untagged or unreadable."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None, None
    owner = name = None
    for entry in data.split(b"\0"):
        key, _, value = entry.partition(b"=")
        if key == ENV_OWNER.encode():
            owner = value.decode(errors="replace")
        elif key == ENV_CHILD.encode():
            name = value.decode(errors="replace")
    return owner, name


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Tagged:
    name: str
    pid: int
    ppid: int
    start_time: int


# --- children we started -------------------------------------------------------------------------


@dataclass
class _Child:
    name: str
    owner: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    start_time: int | None
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_TAIL_LINES)
    )
    reader: threading.Thread | None = None


def _forward(stream: IO[bytes], logger: logging.Logger, tail: collections.deque[str]) -> None:
    """Drain the child's output into the logger so a full pipe never blocks the child."""
    with stream:
        for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                tail.append(line)
                logger.info("%s", line)


class ChildProcessBackend:
    """ProcessBackend that spawns, stops and finds tagged children (optionally in a netns)."""

    name = "process"

    def __init__(
        self,
        netns: str | None = None,
        *,
        startup_grace: float = 0.5,
        stop_timeout: float = 3.0,
    ) -> None:
        self._netns = netns
        # A child that exits within this window failed to start (dnsmasq: port in use).
        self._startup_grace = startup_grace
        self._stop_timeout = stop_timeout
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()

    # --- Backend -------------------------------------------------------------------------------

    def commands(self, step: Step) -> list[str]:
        if isinstance(step, StartProcess):
            return [render(in_netns(step.argv, self._netns))]
        if isinstance(step, StopProcess):
            if step.pid is not None:
                out = [f"kill -TERM {step.pid}"]
            else:
                out = [f"kill -TERM <pid tagged {ENV_OWNER}={step.owner} {ENV_CHILD}={step.name}>"]
            if step.files:
                out.append(render(["rm", "-f", *step.files]))
            return out
        raise BackendError(f"process backend cannot run {type(step).__name__}")

    def prepare(self, step: Step) -> Step:
        return step

    def apply(self, step: Step) -> Step | None:
        if isinstance(step, StartProcess):
            return self._start(step)
        if isinstance(step, StopProcess):
            self._stop(step)
            return None
        raise BackendError(f"process backend cannot run {type(step).__name__}")

    # --- ProcessBackend ------------------------------------------------------------------------

    def running(self, owner: str) -> list[ProcessState]:
        tagged = self._scan(owner, None)
        mine = {(t.pid, t.name) for t in tagged}
        # A helper the child forked (dnsmasq's TCP workers) inherits the tag; list the child once.
        return [
            ProcessState(name=t.name, pid=t.pid, owner=owner)
            for t in tagged
            if (t.ppid, t.name) not in mine
        ]

    def alive(self, pid: int, start_time: int | None) -> bool:
        stat = _read_stat(pid)
        if stat is None or stat.state in ("Z", "X", "x"):
            return False
        return start_time is None or stat.start_time == start_time

    def sweep(self, owner: str) -> list[str]:
        done = []
        for t in self._scan(owner, None):
            if self._terminate(t.pid, t.start_time, t.name):
                done.append(f"process {t.name} (pid {t.pid})")
        return done

    def poll_exited(self) -> list[tuple[str, int]]:
        """Children started here that have exited on their own since the last call, as
        (name, returncode); they are reaped and forgotten (the engine may restart them)."""
        exited = []
        with self._lock:
            for pid, child in list(self._children.items()):
                code = child.popen.poll()
                if code is not None:
                    exited.append((child.name, code))
                    del self._children[pid]
        return exited

    # --- start ---------------------------------------------------------------------------------

    def _start(self, step: StartProcess) -> StopProcess:
        live = [t for t in self._scan(step.owner, step.name) if self.alive(t.pid, t.start_time)]
        if live:
            first = min(live, key=lambda t: t.start_time)
            log.info("%s already runs as pid %d", step.name, first.pid)
            return self._stop_step(step, first.pid, first.start_time)
        self._forget_exited(step.owner, step.name)

        for path in step.files:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BackendError(f"{step.name}: cannot create the directory of {path}: "
                                   f"{exc}") from exc
        existed = {path for path in step.files if os.path.lexists(path)}
        child = self._spawn(step)
        pid = child.popen.pid

        deadline = time.monotonic() + self._startup_grace
        code = child.popen.poll()
        while code is None and time.monotonic() < deadline:
            time.sleep(0.02)
            code = child.popen.poll()
        if code is not None:
            with self._lock:
                self._children.pop(pid, None)
            if child.reader is not None:
                child.reader.join(timeout=1.0)
            self._remove_files(step.name, [p for p in step.files if p not in existed])
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            detail = "\n".join(child.tail) or "(no output)"
            raise BackendError(
                f"{step.name}: {render(child.argv)} {how} right after starting:\n{detail}"
            )
        log.info("started %s as pid %d", step.name, pid)
        return self._stop_step(step, pid, child.start_time)

    def _spawn(self, step: StartProcess) -> _Child:
        argv = in_netns(step.argv, self._netns)
        env = {**os.environ, ENV_OWNER: step.owner, ENV_CHILD: step.name}
        log.debug("$ %s", render(argv))
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_death_signal_hook(os.getpid()),
                # Own process group: a Ctrl-C on wsnic's terminal reaches wsnic only, which then
                # stops its children in order.
                process_group=0,
            )
        except FileNotFoundError as exc:
            raise BackendError(
                f"{argv[0]}: command not found (Debian: apt-get install the package that "
                "provides it)"
            ) from exc
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(f"{step.name}: cannot start {render(argv)}: {exc}") from exc
        child = _Child(step.name, step.owner, argv, popen, start_time_of(popen.pid))
        assert popen.stdout is not None  # stdout=PIPE
        child.reader = threading.Thread(
            target=_forward,
            args=(popen.stdout, logging.getLogger(f"wsnic.{step.name}"), child.tail),
            name=f"wsnic-{step.name}-output",
            daemon=True,
        )
        child.reader.start()
        with self._lock:
            self._children[popen.pid] = child
        return child

    @staticmethod
    def _stop_step(step: StartProcess, pid: int, start_time: int | None) -> StopProcess:
        return StopProcess(step.name, step.argv, step.owner, step.files, pid, start_time)

    # --- stop ----------------------------------------------------------------------------------

    def _stop(self, step: StopProcess) -> None:
        targets: list[tuple[int, int | None]] = []
        if step.pid is not None and self._is_ours(step.pid, step.start_time, step.owner,
                                                  step.name):
            targets.append((step.pid, step.start_time))
        # A stale or missing pid (lost journal, pid reused) falls back to the tag; the tag scan
        # also catches helpers the child forked.
        for t in self._scan(step.owner, step.name):
            if all(t.pid != pid for pid, _ in targets):
                targets.append((t.pid, t.start_time))
        for pid, start_time in targets:
            self._terminate(pid, start_time, step.name)
        self._forget_exited(step.owner, step.name)
        self._remove_files(step.name, step.files)

    def _is_ours(self, pid: int, start_time: int | None, owner: str, name: str) -> bool:
        if not self.alive(pid, start_time):
            return False
        with self._lock:
            child = self._children.get(pid)
        if child is not None and (child.owner, child.name) == (owner, name):
            return start_time is None or child.start_time == start_time
        return _tags(pid) == (owner, name)

    def _terminate(self, pid: int, start_time: int | None, name: str) -> bool:
        """SIGTERM, then SIGKILL after the timeout; False if it was already gone. A pidfd pins
        the process, so a pid reused between the check and the signal is never hit."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            raise BackendError(f"{name}: cannot open pid {pid}: {exc}") from exc
        try:
            if not self.alive(pid, start_time):
                return False
            log.info("stopping %s (pid %d)", name, pid)
            if not self._signal(fd, signal.SIGTERM):
                return True
            if not _wait_exit(fd, self._stop_timeout):
                log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", name, pid)
                self._signal(fd, signal.SIGKILL)
                if not _wait_exit(fd, self._stop_timeout):
                    raise BackendError(f"{name}: pid {pid} survived SIGKILL")
        finally:
            os.close(fd)
            self._reap(pid)
        return True

    @staticmethod
    def _signal(fd: int, sig: signal.Signals) -> bool:
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:
            return False
        return True

    def _reap(self, pid: int) -> None:
        with self._lock:
            child = self._children.get(pid)
        if child is None or child.popen.poll() is None:
            return
        with self._lock:
            self._children.pop(pid, None)
        if child.reader is not None:
            child.reader.join(timeout=1.0)

    def _forget_exited(self, owner: str, name: str) -> None:
        """Reap children of that name that died on their own: a deliberate stop or a restart
        must not be reported again by poll_exited."""
        with self._lock:
            for pid, child in list(self._children.items()):
                if (child.owner, child.name) == (owner, name) and child.popen.poll() is not None:
                    del self._children[pid]

    @staticmethod
    def _remove_files(name: str, files: tuple[str, ...] | list[str]) -> None:
        for path in files:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise BackendError(f"{name}: cannot remove {path}: {exc}") from exc

    # --- scanning ------------------------------------------------------------------------------

    def _scan(self, owner: str, name: str | None) -> list[_Tagged]:
        """Live processes tagged `owner` (and `name` if given) that run in our network namespace
        (the named one, or our own) as our user: the same instance name in another namespace
        is another instance, and a tag anyone could set in their environment proves nothing."""
        ns_path = "/proc/self/ns/net" if self._netns is None else os.path.join(
            NETNS_DIR, self._netns)
        want_ns = _netns_id(ns_path)
        if want_ns is None:
            return []  # the namespace is gone, and with it everything that ran in it
        found = []
        me, uid = os.getpid(), os.geteuid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                if os.stat(f"/proc/{pid}").st_uid != uid:
                    continue
            except FileNotFoundError:
                continue
            tag_owner, tag_name = _tags(pid)
            if tag_owner != owner or tag_name is None or (name is not None and tag_name != name):
                continue
            if _netns_id(f"/proc/{pid}/ns/net") != want_ns:
                continue
            stat = _read_stat(pid)
            if stat is None or stat.state in ("Z", "X", "x"):
                continue
            found.append(_Tagged(tag_name, pid, stat.ppid, stat.start_time))
        return found


def _wait_exit(fd: int, timeout: float) -> bool:
    """True once the process behind the pidfd has exited (the fd turns readable)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))
