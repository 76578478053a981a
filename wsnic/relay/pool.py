"""More than one core: an acceptor in the main process hands connections to worker processes.

The acceptor only accepts: it never reads a byte, so a burst of connections is taken off the
listen queue at once (the backlog is large) and spread over the workers, the least busy first
(round-robin among equals, so a client pair lands on two cores). Each worker relays its clients
(`wsnic.relay.worker`). The acceptor counts the connections it handed out until their worker
reports them ended; at `max_clients` it still hands the connection over, marked "full", so that
the worker answers HTTP 503 in the client's own protocol (plain or TLS).

A channel holds only a few hundred messages. When a worker's channel is full (the worker is busy)
its hand-overs wait in a queue that a writer callback flushes; past MAX_QUEUED waiting in all,
the acceptor stops accepting, and the kernel's listen queue holds the rest. A worker is dead only
when its channel reaches EOF (its process exited, or it closed the channel: then it is killed, so
that it cannot keep serving clients nobody counts).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from wsnic.errors import BackendError
from wsnic.relay.fairness import FairShareBoard
from wsnic.relay.links import AttachPort, LinkServer, ReleasePorts
from wsnic.relay.settings import RelaySettings

log = logging.getLogger("wsnic.relay")

BACKLOG = 4096
READY_WAIT = 20.0  # seconds for a worker to start
STOP_WAIT = 10.0  # seconds for the workers to close their clients
EXIT_WAIT = 0.1  # seconds for a worker whose channel closed to be seen exiting
# The most b"-" in one worker -> acceptor message; the acceptor reads messages this large.
REPORT_MAX = 4096
# Hand-overs waiting for busy workers' channels, in all, before the acceptor stops accepting.
MAX_QUEUED = 2048
ACCEPT_RETRY = 0.5  # seconds before accepting again after EMFILE and friends
# send errors that mean the worker's end of the channel is closed: as good as EOF
_CHANNEL_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)
# A worker runs with -P: no working directory (whose json.py would run as root) on its sys.path.
# The directory wsnic was imported from goes last instead, so that an uninstalled checkout works
# too and nothing in it can shadow the standard library.
_WORKER_MAIN = (f"import sys; sys.path.append({str(Path(__file__).resolve().parents[2])!r}); "
                "from wsnic.relay.worker import main; raise SystemExit(main())")


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (every client costs fds); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # an infinite hard limit is refused
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    links: socket.socket  # its link requests (wsnic.relay.links)
    active: int = 0  # connections handed over or queued, and not yet reported ended
    alive: bool = True
    # (kind, connection) waiting for room in the channel, oldest first
    queue: deque[tuple[bytes, socket.socket]] = field(default_factory=deque)


class WorkerPool:
    def __init__(self, settings: RelaySettings, attach_port: AttachPort,
                 release_ports: ReleasePorts, count: int) -> None:
        self.settings = settings
        # The workers' TAP ports are attached and released here, by the link backend.
        self.links = LinkServer(attach_port, release_ports)
        self.count = count
        self.workers: list[_Worker] = []
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed = asyncio.Event()

    @property
    def active(self) -> int:
        return sum(w.active for w in self.workers)

    @property
    def queued(self) -> int:
        """Connections accepted and waiting for a worker's channel."""
        return sum(len(w.queue) for w in self.workers)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers, wait until each is ready, then listen."""
        self._loop = asyncio.get_running_loop()
        log.debug("acceptor open-file limit: %d", raise_fd_limit())  # queued clients hold fds
        # One memory file for every worker's fair shares (wsnic.relay.fairness); the workers
        # map it, the acceptor needs no copy.
        board = FairShareBoard.create_shared(self.count)
        try:
            for index in range(self.count):
                self.workers.append(self._spawn(index, board))
        finally:
            os.close(board)
        for worker in self.workers:
            self.links.serve(self._loop, worker.links, f"relay worker {worker.index}")
        await self._wait_ready()
        for worker in self.workers:
            self._watch(worker)
        srv = self.settings
        self._listen(srv.ws_port, tls=False)
        if srv.certificate is not None:
            self._listen(srv.wss_port, tls=True)
        log.info("relay runs in %d worker processes (pids %s)", self.count,
                 ", ".join(str(w.proc.pid) for w in self.workers))

    def _spawn(self, index: int, board: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        links, their_links = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = {
            "relay": self.settings.to_json(),
            "index": index,
            "channel": theirs.fileno(),
            "links": their_links.fileno(),
            "board": {"fd": board, "slot": index, "slots": self.count},
            "parent": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_MAIN],
            stdin=subprocess.PIPE,
            pass_fds=[theirs.fileno(), their_links.fileno(), board],
            # Own process group: a terminal's Ctrl-C during start-up does not kill it; the
            # acceptor sends SIGTERM itself.
            process_group=0,
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings).encode())
        proc.stdin.close()
        theirs.close()
        their_links.close()
        return _Worker(index, proc, ours, links)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WAIT
        for worker in self.workers:
            worker.channel.setblocking(False)
            while True:
                try:
                    if worker.channel.recv(1) == b"R":
                        break
                    raise BackendError(f"relay worker {worker.index} exited while starting "
                                       f"(code {worker.proc.poll()})")
                except BlockingIOError:
                    pass
                if worker.proc.poll() is not None:
                    raise BackendError(f"relay worker {worker.index} exited while starting "
                                       f"(code {worker.proc.returncode})")
                if time.monotonic() > deadline:
                    raise BackendError(f"relay worker {worker.index} did not start within "
                                       f"{READY_WAIT:g} s")
                await asyncio.sleep(0.02)

    def _watch(self, worker: _Worker) -> None:
        assert self._loop is not None
        self._loop.add_reader(worker.channel.fileno(), self._from_worker, worker)

    def _unwatch(self, worker: _Worker) -> None:
        if self._loop is None or worker.channel.fileno() < 0:
            return
        self._loop.remove_reader(worker.channel.fileno())
        self._loop.remove_writer(worker.channel.fileno())

    def _listen(self, port: int, tls: bool) -> None:
        host = self.settings.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
        except OSError as exc:
            raise BackendError(
                f"cannot listen on {host}:{port} ({'wss' if tls else 'ws'}): {exc.strerror}"
            ) from exc
        sock.setblocking(False)
        self._listeners.append((sock, tls))
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._accept, sock, tls)
        self._accepting = True
        log.info("listening on %s://%s:%d", "wss" if tls else "ws", host, port)

    async def stop(self) -> None:
        """Stop accepting; ask every worker to close its clients; wait, bounded."""
        self._pause_accepting()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for sock, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        for worker in self.workers:
            if worker.alive:
                self._unwatch(worker)
            while worker.queue:
                worker.queue.popleft()[1].close()
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT
        for worker in self.workers:
            while worker.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if worker.proc.poll() is None:
                log.warning("relay worker %d did not stop in time; killing it", worker.index)
                worker.proc.kill()
                worker.proc.wait()
            worker.channel.close()
        if self._loop is not None:
            self.links.close(self._loop)  # after the workers: they release their TAPs here

    # --- accepting ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        for _ in range(BACKLOG):
            if self.queued >= MAX_QUEUED:  # every worker is behind: leave the rest queued
                self._pause_accepting()
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it queued, say why, retry later
                log.error("accept failed: %s; trying again in %g s", exc, ACCEPT_RETRY)
                self._pause_accepting()
                assert self._loop is not None
                self._retry = self._loop.call_later(ACCEPT_RETRY, self._resume_accepting)
                return
            self._hand_over(conn, tls)

    def _pause_accepting(self) -> None:
        if not self._accepting:
            return
        self._accepting = False
        if self._loop is not None:
            for sock, _ in self._listeners:
                self._loop.remove_reader(sock.fileno())

    def _resume_accepting(self) -> None:
        self._retry = None
        if self._accepting or not self._listeners or self._loop is None:
            return
        self._accepting = True
        for sock, tls in self._listeners:
            self._loop.add_reader(sock.fileno(), self._accept, sock, tls)

    def _hand_over(self, conn: socket.socket, tls: bool) -> None:
        worker = self._choose()
        if worker is None:
            conn.close()
            return
        full = self.active >= self.settings.max_clients
        kind = (b"t" if full else b"T") if tls else (b"p" if full else b"P")
        worker.active += 1
        if worker.queue or not self._pass(worker, kind, conn):
            worker.queue.append((kind, conn))  # behind those already waiting: keep the order
            if len(worker.queue) == 1:
                assert self._loop is not None
                self._loop.add_writer(worker.channel.fileno(), self._flush, worker)

    def _pass(self, worker: _Worker, kind: bytes, conn: socket.socket) -> bool:
        """Send `conn` to `worker`. False: its channel is full (the caller keeps `conn`);
        True: `conn` is dealt with (sent, or given to another worker, or dropped)."""
        try:
            socket.send_fds(worker.channel, [kind], [conn.fileno()])
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _CHANNEL_GONE:
                self._lost(worker, f"its channel is closed ({exc.strerror})")
                self._hand_over(conn, kind in (b"T", b"t"))
                return True
            log.error("cannot hand a connection to relay worker %d: %s", worker.index, exc)
            worker.active -= 1
        conn.close()
        return True

    def _flush(self, worker: _Worker) -> None:
        """The channel has room again: send what waits for it."""
        queue = worker.queue
        while queue and worker.alive:
            kind, conn = queue.popleft()
            if not self._pass(worker, kind, conn):
                queue.appendleft((kind, conn))
                break
        else:
            if self._loop is not None and worker.alive:
                self._loop.remove_writer(worker.channel.fileno())
        if not self._accepting and self._retry is None and self.queued < MAX_QUEUED // 2:
            self._resume_accepting()

    def _choose(self) -> _Worker | None:
        alive = [w for w in self.workers if w.alive]
        if not alive:
            return None
        least = min(w.active for w in alive)
        candidates = [w for w in alive if w.active == least]
        worker = candidates[self._next % len(candidates)]
        self._next += 1
        return worker

    def _from_worker(self, worker: _Worker) -> None:
        while True:
            try:
                message = worker.channel.recv(REPORT_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message = b""
            if not message:
                self._lost(worker, "its channel was closed")
                return
            worker.active -= message.count(b"-")

    def _lost(self, worker: _Worker, why: str) -> None:
        if not worker.alive:
            return
        worker.alive = False
        self._unwatch(worker)
        try:  # a process that dies closes its channel a moment before it can be reaped
            code: int | None = worker.proc.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:  # it runs on without a channel: it must not serve uncounted clients
            worker.proc.kill()
            state = f"{why}; killed"
        else:
            state = f"exit code {code}"
        log.error("relay worker %d (pid %d) is gone (%s); its clients were dropped",
                  worker.index, worker.proc.pid, state)
        worker.active = 0
        waiting = list(worker.queue)
        worker.queue.clear()
        if not any(w.alive for w in self.workers):
            self.failed.set()
        # These never reached the dead worker: the others take them (or they are closed).
        for kind, conn in waiting:
            self._hand_over(conn, kind in (b"T", b"t"))
