"""More than one core: an acceptor in the main process hands connections to worker processes.

The acceptor only accepts: it never reads a byte, so a burst of connections is taken off the
listen queue at once (the backlog is large) and spread over the workers, the least busy first
(round-robin among equals, so a client pair lands on two cores). Each worker relays its clients
(`wsnic.relay.worker`). The acceptor counts the connections it handed out until their worker
reports them ended; at `max_clients` it still hands the connection over, marked "full", so that
the worker answers HTTP 503 in the client's own protocol (plain or TLS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from wsnic.config.models import Profile
from wsnic.errors import BackendError

log = logging.getLogger("wsnic.relay")

BACKLOG = 4096
READY_WAIT = 20.0  # seconds for a worker to start
STOP_WAIT = 10.0  # seconds for the workers to close their clients


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: socket.socket
    active: int = 0  # connections handed over and not yet reported ended
    alive: bool = True


class WorkerPool:
    def __init__(self, profile: Profile, link: str, count: int) -> None:
        self.profile = profile
        self.link = link
        self.count = count
        self.workers: list[_Worker] = []
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed = asyncio.Event()

    @property
    def active(self) -> int:
        return sum(w.active for w in self.workers)

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers, wait until each is ready, then listen."""
        self._loop = asyncio.get_running_loop()
        for index in range(self.count):
            self.workers.append(self._spawn(index))
        await self._wait_ready()
        for worker in self.workers:
            self._loop.add_reader(worker.channel.fileno(), self._from_worker, worker)
        srv = self.profile.server
        self._listen(srv.ws_port, tls=False)
        if srv.tls.certificate is not None:
            self._listen(srv.wss_port, tls=True)
        log.info("relay runs in %d worker processes (pids %s)", self.count,
                 ", ".join(str(w.proc.pid) for w in self.workers))

    def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = {
            "profile": self.profile.model_dump(mode="json"),
            "link": self.link,
            "index": index,
            "channel": theirs.fileno(),
            "parent": os.getpid(),
            "log_level": logging.getLogger().getEffectiveLevel(),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "wsnic.relay.worker"],
            stdin=subprocess.PIPE,
            pass_fds=[theirs.fileno()],
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(settings).encode())
        proc.stdin.close()
        theirs.close()
        return _Worker(index, proc, ours)

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

    def _listen(self, port: int, tls: bool) -> None:
        host = str(self.profile.server.address)
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
        log.info("listening on %s://%s:%d", "wss" if tls else "ws", host, port)

    async def stop(self) -> None:
        """Stop accepting; ask every worker to close its clients; wait, bounded."""
        loop = self._loop
        for sock, _ in self._listeners:
            if loop is not None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        for worker in self.workers:
            if loop is not None and worker.alive:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(worker.channel.fileno())
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

    # --- accepting ----------------------------------------------------------------------------

    def _accept(self, listener: socket.socket, tls: bool) -> None:
        for _ in range(BACKLOG):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it queued, say why
                log.error("accept failed: %s", exc)
                return
            self._hand_over(conn, tls)

    def _hand_over(self, conn: socket.socket, tls: bool) -> None:
        worker = self._choose()
        if worker is None:
            conn.close()
            return
        full = self.active >= self.profile.server.max_clients
        kind = (b"t" if full else b"T") if tls else (b"p" if full else b"P")
        try:
            socket.send_fds(worker.channel, [kind], [conn.fileno()])
        except OSError as exc:
            log.error("relay worker %d cannot take connections: %s", worker.index, exc)
            self._lost(worker)
        else:
            worker.active += 1
        finally:
            conn.close()

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
                message = worker.channel.recv(64)
            except BlockingIOError:
                return
            except OSError:
                message = b""
            if not message:
                self._lost(worker)
                return
            worker.active -= message.count(b"-")

    def _lost(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        worker.alive = False
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(worker.channel.fileno())
        log.error("relay worker %d (pid %d) is gone (exit code %s); its clients were dropped",
                  worker.index, worker.proc.pid, worker.proc.poll())
        worker.active = 0
        if not any(w.alive for w in self.workers):
            self.failed.set()
