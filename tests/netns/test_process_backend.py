"""ChildProcessBackend against real dnsmasq, iperf and the kernel, inside wsnt- namespaces."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.netns import netns, sh, veth_between
from wsnic.backends.base import ProcessBackend
from wsnic.backends.process import ChildProcessBackend, start_time_of
from wsnic.config.models import Network
from wsnic.errors import BackendError
from wsnic.plan.steps import StartProcess, StopProcess
from wsnic.services.dnsmasq import dnsmasq_argv
from wsnic.services.iperf import iperf_argv

root = pytest.mark.root
NET = Network()  # 192.168.86.0/24 on wsbr0


@dataclass
class Lan:
    server: str  # namespace with the bridge (where wsnic's children run)
    guest: str  # namespace of a guest attached to the bridge through veth "eth0"
    owner: str
    backend: ChildProcessBackend


@pytest.fixture
def lan() -> Iterator[Lan]:
    with netns("srv") as server, netns("gst") as guest:
        sh(["ip", "link", "add", "wsbr0", "type", "bridge"], netns=server)
        sh(["ip", "addr", "add", "192.168.86.1/24", "dev", "wsbr0"], netns=server)
        sh(["ip", "link", "set", "wsbr0", "up"], netns=server)
        veth_between(server, "vg0", guest, "eth0")
        sh(["ip", "link", "set", "vg0", "master", "wsbr0", "up"], netns=server)
        sh(["ip", "link", "set", "eth0", "up"], netns=guest)
        backend = ChildProcessBackend(server)
        owner = f"wsnic:{server}"
        try:
            yield Lan(server, guest, owner, backend)
        finally:
            backend.sweep(owner)


def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def ns_pids(ns: str) -> set[int]:
    return {int(p) for p in sh(["ip", "netns", "pids", ns]).stdout.split()}


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in raw if e)


def dnsmasq_step(name: str, owner: str, lease: Path) -> StartProcess:
    return StartProcess(name, dnsmasq_argv(NET, str(lease)), owner, files=(str(lease),))


@contextlib.contextmanager
def foreign_sleep(ns: str) -> Iterator[subprocess.Popen[bytes]]:
    """An untagged process started by the test (not by the backend), killed by its pid."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        assert wait_for(lambda: start_time_of(proc.pid) is not None)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=5)


# --- pure --------------------------------------------------------------------------------------


def test_commands_render_exact_argv_and_kill():
    backend: ProcessBackend = ChildProcessBackend("wsnt-x")  # mypy checks the Protocol
    assert backend.name == "process"
    start = StartProcess("iperf:wsbr0", iperf_argv(NET), "wsnic:t")
    assert backend.commands(start) == [
        "ip netns exec wsnt-x iperf -s -B 192.168.86.1 -f m"
    ]
    assert ChildProcessBackend().commands(start) == ["iperf -s -B 192.168.86.1 -f m"]
    stop = StopProcess("d", ("dnsmasq",), "wsnic:t", ("/run/wsnic/a b.leases",), 1234, 99)
    assert backend.commands(stop) == ["kill -TERM 1234", "rm -f '/run/wsnic/a b.leases'"]
    assert backend.prepare(start) is start


def test_start_time_survives_a_comm_with_spaces_and_parens(tmp_path):
    weird = tmp_path / "a) b (c"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", weird)
    procs = []
    try:
        for exe in ("sleep", str(weird), "sleep"):
            procs.append(subprocess.Popen([exe, "30"]))
            time.sleep(0.02)
        maybe = [start_time_of(p.pid) for p in procs]
        times = [t for t in maybe if t is not None]
        assert len(times) == 3
        assert times == sorted(times)  # start times in ticks grow with start order
        assert Path(f"/proc/{procs[1].pid}/comm").read_text().startswith("a) b (c")
        assert ChildProcessBackend().alive(procs[1].pid, times[1])
        assert not ChildProcessBackend().alive(procs[1].pid, times[1] + 1)  # pid "reused"
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=5)


# --- dnsmasq -----------------------------------------------------------------------------------


@root
def test_dnsmasq_runs_tagged_in_the_netns_and_serves_dhcp(lan: Lan, tmp_path, caplog):
    lease = tmp_path / "state" / "wsnic.default.leases"  # parent dir created by the backend
    step = dnsmasq_step("dnsmasq:wsbr0", lan.owner, lease)
    with caplog.at_level(logging.INFO, logger="wsnic"):
        stop = lan.backend.apply(step)
    assert isinstance(stop, StopProcess)
    assert stop.pid is not None and stop.start_time == start_time_of(stop.pid)
    assert (stop.name, stop.argv, stop.owner, stop.files) == (
        step.name, step.argv, step.owner, step.files)
    pid = stop.pid

    assert pid in ns_pids(lan.server)
    env = environ(pid)
    assert env["WSNIC_OWNER"] == lan.owner and env["WSNIC_CHILD"] == "dnsmasq:wsbr0"
    assert [(p.name, p.pid) for p in lan.backend.running(lan.owner)] == [("dnsmasq:wsbr0", pid)]
    assert lan.backend.alive(pid, stop.start_time)
    # dnsmasq's stderr log reaches the "wsnic.<name>" logger.
    assert wait_for(lambda: any(r.name == "wsnic.dnsmasq:wsbr0" and "started" in r.getMessage()
                                for r in caplog.records))

    # Applying again is a no-op that hands back the same child.
    again = lan.backend.apply(step)
    assert again == stop

    dhcp = sh(["timeout", "20", "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-t", "5",
               "-T", "1", "-s", "/bin/true"], netns=lan.guest, check=False, timeout=30)
    assert dhcp.returncode == 0, dhcp.stderr
    got = re.search(r"lease of (\S+) obtained", dhcp.stdout + dhcp.stderr)
    assert got, dhcp.stdout + dhcp.stderr
    addr = got.group(1)
    assert NET.pool_first <= ipaddress.IPv4Address(addr) <= NET.pool_last
    mac = json.loads(sh(["ip", "-j", "link", "show", "eth0"], netns=lan.guest).stdout)[0][
        "address"]
    assert wait_for(lambda: f"{mac} {addr}" in lease.read_text())

    assert lan.backend.apply(stop) is None
    assert not lan.backend.alive(pid, stop.start_time)
    assert pid not in ns_pids(lan.server)
    assert not lease.exists()
    assert lan.backend.running(lan.owner) == []
    lan.backend.apply(stop)  # already gone: still a success
    assert lan.backend.poll_exited() == []  # a deliberate stop is not a crash


@root
def test_second_dnsmasq_on_the_same_address_fails_clearly(lan: Lan, tmp_path):
    first = lan.backend.apply(dnsmasq_step("dnsmasq:a", lan.owner, tmp_path / "a.leases"))
    assert isinstance(first, StopProcess)
    second_lease = tmp_path / "b.leases"
    with pytest.raises(BackendError) as err:
        lan.backend.apply(dnsmasq_step("dnsmasq:b", lan.owner, second_lease))
    text = str(err.value)
    assert "dnsmasq:b" in text and "exited with code 2" in text
    assert "Address already in use" in text
    assert not second_lease.exists()  # what the failed start created is gone again
    assert [p.name for p in lan.backend.running(lan.owner)] == ["dnsmasq:a"]
    assert lan.backend.poll_exited() == []  # the failure was reported once, by the exception
    lan.backend.apply(first)
    assert lan.backend.running(lan.owner) == []


@root
def test_stop_without_pid_finds_the_child_by_its_tag(lan: Lan, tmp_path):
    lease = tmp_path / "l.leases"
    stop = lan.backend.apply(dnsmasq_step("dnsmasq:wsbr0", lan.owner, lease))
    assert isinstance(stop, StopProcess) and stop.pid is not None
    # A journal-less rollback: a fresh backend (no Popen objects) and no pid.
    ChildProcessBackend(lan.server).apply(
        StopProcess(stop.name, stop.argv, stop.owner, stop.files))
    assert wait_for(lambda: not lan.backend.alive(stop.pid or 0, stop.start_time))
    assert not lease.exists()


@root
def test_stale_start_time_or_missing_tag_never_kills_that_pid(lan: Lan):
    with foreign_sleep(lan.server) as proc:
        real = start_time_of(proc.pid)
        assert real is not None
        stale = StopProcess("dnsmasq:wsbr0", ("dnsmasq",), lan.owner, (), proc.pid, real - 1)
        lan.backend.apply(stale)
        # Right pid and start time, but the process does not carry our tag.
        untagged = StopProcess("dnsmasq:wsbr0", ("dnsmasq",), lan.owner, (), proc.pid, real)
        lan.backend.apply(untagged)
        time.sleep(0.2)
        assert proc.poll() is None
        assert lan.backend.alive(proc.pid, real)


@root
def test_sweep_stops_only_that_owners_children(lan: Lan):
    other = f"{lan.owner}-other"
    for i in range(2):
        lan.backend.apply(StartProcess(f"sleep:{i}", ("sleep", "30"), lan.owner))
    keep = lan.backend.apply(StartProcess("sleep:x", ("sleep", "30"), other))
    assert isinstance(keep, StopProcess)
    try:
        assert sorted(p.name for p in lan.backend.running(lan.owner)) == ["sleep:0", "sleep:1"]
        swept = lan.backend.sweep(lan.owner)
        assert len(swept) == 2 and all("sleep:" in s for s in swept)
        assert lan.backend.running(lan.owner) == []
        assert lan.backend.alive(keep.pid or 0, keep.start_time)
    finally:
        lan.backend.sweep(other)
    assert lan.backend.running(other) == []


@root
def test_poll_exited_reports_crashed_children(lan: Lan, tmp_path):
    quick = lan.backend.apply(StartProcess("sleep:short", ("sleep", "0.8"), lan.owner))
    dns = lan.backend.apply(dnsmasq_step("dnsmasq:wsbr0", lan.owner, tmp_path / "l.leases"))
    assert isinstance(quick, StopProcess) and isinstance(dns, StopProcess)
    assert dns.pid is not None
    os.kill(dns.pid, signal.SIGKILL)  # our own child, by its pid
    exited: list[tuple[str, int]] = []

    def collect() -> bool:
        exited.extend(lan.backend.poll_exited())
        return len(exited) == 2

    assert wait_for(collect, timeout=5)
    assert sorted(exited) == [("dnsmasq:wsbr0", -signal.SIGKILL), ("sleep:short", 0)]
    assert lan.backend.poll_exited() == []


@root
def test_a_child_that_ignores_sigterm_gets_sigkill(lan: Lan):
    backend = ChildProcessBackend(lan.server, stop_timeout=0.5)
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
    stop = backend.apply(StartProcess("stubborn", (sys.executable, "-c", script), lan.owner))
    assert isinstance(stop, StopProcess) and stop.pid is not None
    began = time.monotonic()
    backend.apply(stop)
    assert time.monotonic() - began < 5
    assert not backend.alive(stop.pid, stop.start_time)


# --- iperf -------------------------------------------------------------------------------------


@root
def test_iperf_server_answers_a_bounded_client(lan: Lan):
    sh(["ip", "addr", "add", "192.168.86.50/24", "dev", "eth0"], netns=lan.guest)
    stop = lan.backend.apply(StartProcess("iperf:wsbr0", iperf_argv(NET), lan.owner))
    assert isinstance(stop, StopProcess) and stop.pid in ns_pids(lan.server)
    result = None
    for _ in range(3):  # the server may still be binding right after the grace period
        result = sh(["timeout", "15", "iperf", "-c", "192.168.86.1", "-t", "1", "-f", "m"],
                    netns=lan.guest, check=False, timeout=20)
        if result.returncode == 0 and "Mbits/sec" in result.stdout:
            break
        time.sleep(0.5)
    assert result is not None and result.returncode == 0, result and result.stderr
    assert "Mbits/sec" in result.stdout
    lan.backend.apply(stop)
    assert stop.pid not in ns_pids(lan.server)


# --- death with the parent ---------------------------------------------------------------------

PARENT = r"""
import sys, time
from wsnic.backends.base import ProcessBackend
from wsnic.backends.process import ChildProcessBackend
from wsnic.plan.steps import StartProcess
name, owner, *argv = sys.argv[1:]
stop = ChildProcessBackend().apply(StartProcess(name, tuple(argv), owner))
print(stop.pid, stop.start_time, flush=True)
time.sleep(60)
"""


@root
@pytest.mark.parametrize("kind", ["dnsmasq", "sleep"])
def test_children_die_when_wsnic_is_killed(lan: Lan, tmp_path, kind):
    lease = str(tmp_path / "l.leases")
    argv = dnsmasq_argv(NET, lease) if kind == "dnsmasq" else ("sleep", "60")
    parent = subprocess.Popen(
        ["ip", "netns", "exec", lan.server, sys.executable, "-c", PARENT, kind, lan.owner,
         *argv],
        stdout=subprocess.PIPE, text=True,
    )
    pid = start = None
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 15)
        assert ready, "the parent never reported its child"
        pid, start = (int(v) for v in parent.stdout.readline().split())
        assert lan.backend.alive(pid, start)
        assert environ(pid)["WSNIC_CHILD"] == kind
        parent.kill()  # SIGKILL: no handler, no cleanup in the parent
        parent.wait(timeout=5)
        assert wait_for(lambda: not lan.backend.alive(pid or 0, start), timeout=5), (
            f"{kind} (pid {pid}) outlived its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=5)
        if pid is not None and lan.backend.alive(pid, start):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.root
def test_a_tagged_process_elsewhere_is_not_ours() -> None:
    """The same tag in another namespace is another instance; a tag set by another user is
    not a proof of ownership. Neither is seen, adopted or stopped."""
    owner, name = "wsnic:xt", "sleeper"
    env = {**os.environ, "WSNIC_OWNER": owner, "WSNIC_CHILD": name}
    with netns("pa") as ns_a, netns("pb") as ns_b:
        other_ns = subprocess.Popen(["ip", "netns", "exec", ns_a, "sleep", "30"], env=env)
        other_user = subprocess.Popen(
            ["ip", "netns", "exec", ns_b, "setpriv", "--reuid=65534", "--regid=65534",
             "--clear-groups", "sleep", "30"], env=env)
        try:
            # wait until setpriv has really switched to the other user (and exec'd sleep)
            def switched() -> bool:
                uids = set()
                for pid in ns_pids(ns_b):
                    with contextlib.suppress(FileNotFoundError):
                        uids.add(os.stat(f"/proc/{pid}").st_uid)
                return len(ns_pids(ns_a)) == 1 and uids == {65534}

            assert wait_for(switched)
            backend = ChildProcessBackend(ns_b)
            assert backend.running(owner) == []
            assert backend.sweep(owner) == []
            assert ChildProcessBackend(ns_a).running(owner)  # visible where it really runs
            assert other_ns.poll() is None and other_user.poll() is None
        finally:
            for proc in (other_ns, other_user):
                proc.kill()
                proc.wait()
