"""A relay worker process: serves the connections its acceptor hands over, each with its own TAP.

Started by `wsnic.relay.pool.WorkerPool` (`python -P`, then `main()`), with its settings as JSON
on stdin; it inherits the memory file of the fair-share board (wsnic.relay.fairness), one end of
a SOCK_SEQPACKET pair for its link requests (wsnic.relay.links: the main process attaches and
releases its TAPs) and one end of another (the channel):

    acceptor -> worker   b"P" / b"T" + one fd: a plain / TLS connection to serve
                         b"p" / b"t" + one fd: the same, but the server is full: answer 503
    worker -> acceptor   b"R" once ready; then messages of N b"-": N connections it was given
                         have ended (a hand-over whose fd the kernel dropped counts as ended)

A frame from client A to client B crosses the kernel bridge from A's TAP to B's TAP, so workers
never talk to each other. A worker dies with its acceptor (PR_SET_PDEATHSIG) and stops cleanly,
closing every TAP, on SIGTERM.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from wsnic.logs import setup_logging
from wsnic.relay.fairness import FairShareBoard
from wsnic.relay.links import LinkClient
from wsnic.relay.pool import REPORT_MAX, raise_fd_limit
from wsnic.relay.server import RelayServer
from wsnic.relay.settings import RelaySettings

log = logging.getLogger("wsnic.relay")

KINDS = {b"P": (False, False), b"T": (True, False), b"p": (False, True), b"t": (True, True)}
_PR_SET_PDEATHSIG = 1
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)  # room for one fd
# Hand-overs taken per wake-up; the reader is level-triggered, the rest follows after the others.
HANDOVER_BATCH = 256


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


class CloseReports:
    """Tells the acceptor that connections ended, without ever blocking or losing a count.

    The channel to the acceptor holds a few hundred messages; when it is full (the acceptor is
    busy) that is no reason to stop: the ends add up and go out as one message of N b"-" when
    the channel is writable again. Only a channel that is gone calls `on_gone`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, channel: socket.socket,
                 on_gone: Callable[[], None]) -> None:
        self.loop = loop
        self.channel = channel
        self.on_gone = on_gone
        self.unreported = 0
        self.waiting = False  # a writer callback waits for room in the channel

    def closed(self) -> None:
        self.unreported += 1
        if not self.waiting:
            self.flush()

    def flush(self) -> None:
        while self.unreported:
            count = min(self.unreported, REPORT_MAX)
            try:
                self.channel.send(b"-" * count)
            except BlockingIOError:
                if not self.waiting:
                    self.waiting = True
                    self.loop.add_writer(self.channel.fileno(), self.flush)
                return
            except OSError:
                self._idle()
                self.on_gone()  # the acceptor is gone
                return
            self.unreported -= count
        self._idle()

    def _idle(self) -> None:
        if self.waiting:
            self.waiting = False
            self.loop.remove_writer(self.channel.fileno())


def _passed_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class HandOvers:
    """Reads the acceptor's hand-overs and gives each connection to the relay.

    Every hand-over message counts as one connection at the acceptor, so one that arrives
    without its fd (the kernel drops it, with MSG_CTRUNC, when this process is at its open-file
    limit) is reported ended at once; otherwise the acceptor's count would only ever grow.
    """

    def __init__(self, channel: socket.socket, relay: RelayServer, reports: CloseReports,
                 on_gone: Callable[[], None]) -> None:
        self.channel = channel
        self.relay = relay
        self.reports = reports
        self.on_gone = on_gone
        self.dropped = 0  # hand-overs that came without their fd

    def readable(self) -> None:
        dropped = 0
        try:
            for _ in range(HANDOVER_BATCH):
                try:
                    message, ancdata, flags, _ = self.channel.recvmsg(16, _FD_SPACE)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    message, ancdata, flags = b"", [], 0
                if not message:
                    self.on_gone()  # the acceptor closed the channel
                    return
                fds = _passed_fds(ancdata)
                if not fds or flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    dropped += 1
                    self.reports.closed()
                    continue
                for extra in fds[1:]:
                    os.close(extra)
                tls, refuse = KINDS.get(message[:1], (False, True))
                self.relay.adopt(socket.socket(fileno=fds[0]), tls, refuse)
        finally:
            if dropped:
                self.dropped += dropped
                log.warning("%d connections were lost on their way to this worker: it is at its "
                            "open-file limit", dropped)


async def _serve(relay_settings: RelaySettings, links: LinkClient, channel: socket.socket,
                 index: int, board: FairShareBoard) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reports = CloseReports(loop, channel, stop.set)
    relay = RelayServer(relay_settings, links.attach_port, on_connection_closed=reports.closed,
                        release_ports=links.release_ports, board=board)
    await relay.start(listen=False)

    def gone() -> None:
        stop.set()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(channel.fileno())

    handovers = HandOvers(channel, relay, reports, gone)
    channel.setblocking(False)
    loop.add_reader(channel.fileno(), handovers.readable)
    channel.send(b"R")
    log.debug("relay worker %d ready (pid %d)", index, os.getpid())
    try:
        await stop.wait()
    finally:
        loop.remove_reader(channel.fileno())
        await relay.stop()
        links.close()


def main() -> int:
    settings: dict[str, Any] = json.loads(sys.stdin.read())
    _die_with_parent(int(settings["parent"]))
    # The acceptor decides when to stop and sends SIGTERM; a stray SIGINT or SIGHUP does not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(int(settings["log_level"]), tag=f"[w{settings['index']}]")
    log.debug("relay worker %s: open-file limit %d", settings["index"], raise_fd_limit())
    relay_settings = RelaySettings.from_json(settings["relay"])
    channel = socket.socket(fileno=int(settings["channel"]))
    shared = settings["board"]
    board = FairShareBoard.attach(int(shared["fd"]), int(shared["slot"]), int(shared["slots"]))
    links = LinkClient(socket.socket(fileno=int(settings["links"])))
    asyncio.run(_serve(relay_settings, links, channel, int(settings["index"]), board))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
