"""The acceptor and its workers, without root.

Most tests give a WorkerPool stand-in workers: the worker's end of each channel stays in the test,
which reads it only when it chooses (a busy worker), and a `sleep` process stands in for the
worker process. The others start real worker processes (`wsnic.relay.worker`), which serve
connections that need no TAP: one end of a socket pair, or a TCP connection on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsnic.config.models import Profile
from wsnic.relay.fairness import FairShareBoard
from wsnic.relay.pool import MAX_QUEUED, REPORT_MAX, WorkerPool, _Worker, raise_fd_limit
from wsnic.relay.settings import RelaySettings

TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def NO_LINKS(tap: str, bridge: str) -> None:
    raise AssertionError(f"no TAP is attached in these tests ({tap} -> {bridge})")


def NO_RELEASE(taps: list[str]) -> None:
    raise AssertionError(f"no TAP is released in these tests ({taps})")


def profile(**server: object) -> Profile:
    return Profile.model_validate({"server": {"ws_port": free_port(), **server}})


def need_fds(count: int) -> None:
    if raise_fd_limit() < count:
        pytest.skip(f"needs {count} open files")


class StandIn:
    """The worker's end of a channel: takes hand-overs only once `serve` is called."""

    def __init__(self, end: socket.socket) -> None:
        self.end = end
        self.got: list[int] = []  # what each connection said first (its number)
        self.reporting = True  # tell the acceptor about ends (else they add up)
        self.unreported = 0

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.end.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.end, 16, 1)
            except BlockingIOError:
                break
            assert message in (b"P", b"T"), message
            [fd] = fds
            with socket.socket(fileno=fd) as conn:
                conn.settimeout(TIMEOUT)
                self.got.append(struct.unpack("!I", conn.recv(4))[0])
            self.unreported += 1
        self.report()

    def report(self) -> None:
        while self.reporting and self.unreported:  # like a worker: N dashes in a message
            count = min(self.unreported, REPORT_MAX)
            self.end.send(b"-" * count)
            self.unreported -= count


@contextlib.contextmanager
def stand_in_pool(count: int, **server: object) -> Iterator[tuple[WorkerPool, list[StandIn]]]:
    pool = WorkerPool(RelaySettings.from_profile(profile(max_clients=65536, **server)),
                      NO_LINKS, NO_RELEASE, count)
    pool._loop = asyncio.get_running_loop()
    stand_ins: list[StandIn] = []
    try:
        for index in range(count):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            theirs.setblocking(False)
            stand_ins.append(StandIn(theirs))
            links = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # never used
            worker = _Worker(index, subprocess.Popen(["sleep", "60"]), ours, links)
            pool.workers.append(worker)
            pool._watch(worker)
        yield pool, stand_ins
    finally:
        for stand_in in stand_ins:
            with contextlib.suppress(ValueError):
                pool._loop.remove_reader(stand_in.end.fileno())
            stand_in.end.close()
        for worker in pool.workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
            worker.proc.wait()
        for sock, _ in pool._listeners:
            pool._loop.remove_reader(sock.fileno())
            sock.close()
        for worker in pool.workers:
            pool._unwatch(worker)
            while worker.queue:
                worker.queue.popleft()[1].close()
            worker.channel.close()
            worker.links.close()


async def until(check: object, what: str, timeout: float = TIMEOUT) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def numbered(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """Socket pairs; each first end has sent its number, so that its receiver can tell it."""
    pairs = []
    for number in range(count):
        ours, theirs = socket.socketpair()
        theirs.sendall(struct.pack("!I", number))
        pairs.append((ours, theirs))
    return pairs


def test_a_burst_waits_for_busy_workers_instead_of_killing_them() -> None:
    count = MAX_QUEUED + 1000  # more than the channels and the queue hold together
    need_fds(3 * count)

    async def main() -> None:
        with stand_in_pool(2) as (pool, stand_ins):
            port = pool.settings.ws_port
            pool._listen(port, tls=False)
            clients: list[socket.socket] = []
            try:
                await burst(pool, stand_ins, port, count, clients)
            finally:
                for sock in clients:
                    sock.close()

    asyncio.run(asyncio.wait_for(main(), 60))


async def burst(pool: WorkerPool, stand_ins: list[StandIn], port: int, count: int,
                clients: list[socket.socket]) -> None:
    for number in range(count):  # all connected before the acceptor runs: a burst
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(struct.pack("!I", number))
        clients.append(sock)
    await asyncio.sleep(0.3)
    # Neither worker reads: the channels are full, the rest waits in the acceptor.
    assert all(w.alive for w in pool.workers) and not pool.failed.is_set()
    assert pool.queued == MAX_QUEUED and not pool._accepting
    in_channels = pool.active - pool.queued
    assert 0 < in_channels < 1000, in_channels
    assert pool.active < count  # the rest waits in the kernel's listen queue
    for stand_in in stand_ins:
        stand_in.serve(asyncio.get_running_loop())
    await until(lambda: sum(len(s.got) for s in stand_ins) == count,
                "every connection to reach a worker")
    await until(lambda: pool.active == 0, "every end to be reported")
    assert sorted(stand_ins[0].got + stand_ins[1].got) == list(range(count))
    for stand_in in stand_ins:  # each worker got its share, in the order accepted
        assert len(stand_in.got) > count // 4
        assert stand_in.got == sorted(stand_in.got)
    assert pool.queued == 0 and pool._accepting
    assert all(w.alive for w in pool.workers) and not pool.failed.is_set()


def test_a_dead_worker_leaves_its_queue_to_the_others_and_a_live_one_is_killed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="wsnic.relay")

    async def main() -> None:
        with stand_in_pool(2) as (pool, stand_ins):
            stuck, other = pool.workers
            stand_ins[1].reporting = False  # so that both stay equally busy
            stand_ins[1].serve(asyncio.get_running_loop())
            pairs = numbered(1200)
            for ours, _ in pairs:
                pool._hand_over(ours, tls=False)
                await asyncio.sleep(0)  # the serving worker reads meanwhile
            assert stuck.alive and stuck.queue, "the stuck worker's channel never filled"
            in_its_channel = stuck.active - len(stuck.queue)
            # Its end of the channel closes while its process still runs: it is killed, and
            # what waited for it goes to the other worker.
            stand_ins[0].end.close()
            await until(lambda: not stuck.alive, "the closed channel to be noticed")
            assert stuck.proc.wait(TIMEOUT) == -signal.SIGKILL
            assert stuck.active == 0 and not stuck.queue and not pool.failed.is_set()
            await until(lambda: len(stand_ins[1].got) == len(pairs) - in_its_channel,
                        "the queued connections to reach the other worker")
            assert other.active == len(stand_ins[1].got)
            stand_ins[1].reporting = True
            stand_ins[1].report()
            await until(lambda: other.active == 0, "their ends to be reported")
            # Without any worker left the pool has failed; new connections are closed.
            stand_ins[1].end.close()
            await until(pool.failed.is_set, "the pool to fail")
            ours, theirs = socket.socketpair()
            pool._hand_over(ours, tls=False)
            assert theirs.recv(1) == b""
            theirs.close()
            for _, theirs in pairs:
                theirs.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert "relay worker 0 (pid " in caplog.text
    assert "is gone (its channel was closed; killed)" in caplog.text


# --- real worker processes --------------------------------------------------------------------

@contextlib.contextmanager
def worker_process(**server: object) -> Iterator[_Worker]:
    pool = WorkerPool(RelaySettings.from_profile(profile(**server)), NO_LINKS, NO_RELEASE, 1)
    board = FairShareBoard.create_shared(1)
    try:
        worker = pool._spawn(0, board)
    finally:
        os.close(board)
    try:
        worker.channel.settimeout(TIMEOUT)
        assert worker.channel.recv(1) == b"R"
        yield worker
    finally:
        if worker.proc.poll() is None:
            worker.proc.terminate()
            try:
                worker.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
        worker.channel.close()
        worker.links.close()


def hand_over(worker: _Worker, sock: socket.socket) -> None:
    socket.send_fds(worker.channel, [b"P"], [sock.fileno()])
    sock.close()


def read_reports(worker: _Worker, want: int, timeout: float = TIMEOUT) -> int:
    """Dashes from the worker until `want` (or the timeout, or EOF)."""
    got = 0
    deadline = time.monotonic() + timeout
    worker.channel.settimeout(0.2)
    while got < want and time.monotonic() < deadline:
        try:
            message = worker.channel.recv(REPORT_MAX)
        except TimeoutError:
            continue
        if not message:
            break
        got += message.count(b"-")
    return got


def test_a_worker_keeps_every_report_while_the_acceptor_does_not_read() -> None:
    count = 1000  # more ends than the channel holds messages
    with worker_process() as worker:
        for _ in range(count):
            ours, theirs = socket.socketpair()
            theirs.close()  # the connection ends as soon as the worker serves it
            hand_over(worker, ours)
        time.sleep(1.0)  # the acceptor is busy: nothing is read from the channel
        assert worker.proc.poll() is None, "the worker stopped"
        assert read_reports(worker, count) == count
        assert worker.proc.poll() is None


def test_stopped_workers_serve_a_burst_once_they_continue() -> None:
    count = 1500  # several channels' worth for each of the two workers
    need_fds(3 * count)

    async def main() -> None:
        pool = WorkerPool(RelaySettings.from_profile(profile()), NO_LINKS, NO_RELEASE, 2)
        await pool.start()
        clients: list[socket.socket] = []
        try:
            for worker in pool.workers:
                os.kill(worker.proc.pid, signal.SIGSTOP)  # busy: reads nothing for a while
            port = pool.settings.ws_port
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.setblocking(False)
                clients.append(sock)
            await asyncio.sleep(0.5)
            assert all(w.alive for w in pool.workers) and not pool.failed.is_set()
            assert pool.active == count and pool.queued > 0
            for worker in pool.workers:
                os.kill(worker.proc.pid, signal.SIGCONT)
            loop = asyncio.get_running_loop()
            for sock in clients:  # every client gets its answer (426: not a WebSocket request)
                answer = await asyncio.wait_for(loop.sock_recv(sock, 64), TIMEOUT)
                assert answer.startswith(b"HTTP/1.1 426 "), answer
            await until(lambda: pool.active == 0, "every end to be reported")
            assert all(w.proc.poll() is None for w in pool.workers)
        finally:
            for worker in pool.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.proc.pid, signal.SIGCONT)
            for sock in clients:
                sock.close()
            await pool.stop()
        assert [w.proc.returncode for w in pool.workers] == [0, 0]

    asyncio.run(asyncio.wait_for(main(), 60))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hand_overs_the_kernel_drops_at_the_fd_limit_are_reported_ended() -> None:
    count = 40
    with worker_process() as worker:
        pid = worker.proc.pid
        room = 5
        limit = open_fds(pid) + room
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        peers = []
        for _ in range(count):
            ours, theirs = socket.socketpair()
            peers.append(theirs)  # held open: the served connections stay
            hand_over(worker, ours)
        # The fds beyond the limit never arrive: each such hand-over is reported at once.
        dropped = read_reports(worker, count - room - 2)
        assert count - room - 2 <= dropped < count, dropped
        for theirs in peers:
            theirs.close()
        # The served ones end too: every hand-over is accounted for.
        assert dropped + read_reports(worker, count - dropped) == count
        assert worker.proc.poll() is None


def limits_of(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError(f"no open-file limit for pid {pid}")


def test_a_worker_raises_its_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = open_fds(os.getpid()) + 256
    if hard == resource.RLIM_INFINITY or hard <= low:
        pytest.skip(f"needs a finite hard limit above {low}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with worker_process() as worker:
            assert limits_of(worker.proc.pid) == (str(hard), str(hard))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


ACCEPTOR = """
import asyncio, sys
from wsnic.config.models import Profile
from wsnic.relay.pool import WorkerPool
from wsnic.relay.settings import RelaySettings

def no_links(*args):
    raise AssertionError("no TAP is attached here")

async def main():
    profile = Profile.model_validate({"server": {"ws_port": int(sys.argv[1])}})
    pool = WorkerPool(RelaySettings.from_profile(profile), no_links, no_links, 1)
    await pool.start()
    print(pool.workers[0].proc.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # exited, not (yet) reaped


def test_workers_ignore_the_working_directory_and_die_with_the_acceptor(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    # A module in the directory wsnic is started from must never be imported by a worker.
    (tmp_path / "json.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(7)\n")
    acceptor = subprocess.Popen([sys.executable, "-P", "-c", ACCEPTOR, str(free_port())],
                                cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    worker_pid = 0
    try:
        assert acceptor.stdout is not None
        line = acceptor.stdout.readline()
        assert line.strip().isdigit(), f"the acceptor did not start (exit {acceptor.wait()})"
        worker_pid = int(line)
        assert not marker.exists()
        assert os.getpgid(worker_pid) == worker_pid  # its own process group
        os.kill(acceptor.pid, signal.SIGKILL)
        acceptor.wait(TIMEOUT)
        deadline = time.monotonic() + TIMEOUT
        while not gone(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived its acceptor"
            time.sleep(0.05)
    finally:
        if acceptor.poll() is None:
            acceptor.kill()
            acceptor.wait()
        if acceptor.stdout is not None:
            acceptor.stdout.close()
        if worker_pid and not gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
