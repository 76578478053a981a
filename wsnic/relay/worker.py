"""A relay worker process: serves the connections its acceptor hands over, each with its own TAP.

Started by `wsnic.relay.pool.WorkerPool` as `python -m wsnic.relay.worker`, with its settings as
JSON on stdin and one end of a SOCK_SEQPACKET socket pair (the channel) as an inherited fd:

    acceptor -> worker   b"P" / b"T" + one fd: a plain / TLS connection to serve
                         b"p" / b"t" + one fd: the same, but the server is full: answer 503
    worker -> acceptor   b"R" once ready; b"-" whenever a connection it was given has ended

A frame from client A to client B crosses the kernel bridge from A's TAP to B's TAP, so workers
never talk to each other. A worker dies with its acceptor (PR_SET_PDEATHSIG) and stops cleanly,
closing every TAP, on SIGTERM.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys

from wsnic.backends.select import link_backend
from wsnic.config.models import Profile
from wsnic.logs import setup_logging
from wsnic.relay.server import RelayServer

log = logging.getLogger("wsnic.relay")

KINDS = {b"P": (False, False), b"T": (True, False), b"p": (False, True), b"t": (True, True)}
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


async def _serve(profile: Profile, link: str, channel: socket.socket, index: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    backend = link_backend(link)  # type: ignore[arg-type]

    def closed() -> None:
        try:
            channel.send(b"-")
        except OSError:
            stop.set()  # the acceptor is gone

    relay = RelayServer(profile, backend.attach_port, on_connection_closed=closed)
    await relay.start(listen=False)

    def readable() -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(channel, 16, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                stop.set()  # the acceptor closed the channel
                loop.remove_reader(channel.fileno())
                return
            for fd in fds:
                tls, refuse = KINDS.get(message[:1], (False, True))
                relay.adopt(socket.socket(fileno=fd), tls, refuse)

    channel.setblocking(False)
    loop.add_reader(channel.fileno(), readable)
    channel.send(b"R")
    log.debug("relay worker %d ready (pid %d)", index, os.getpid())
    try:
        await stop.wait()
    finally:
        loop.remove_reader(channel.fileno())
        await relay.stop()
        backend.close()


def main() -> int:
    settings = json.loads(sys.stdin.read())
    _die_with_parent(int(settings["parent"]))
    # Ctrl-C reaches the whole process group; the acceptor decides and sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(int(settings["log_level"]), tag=f"[w{settings['index']}]")
    profile = Profile.model_validate(settings["profile"])
    channel = socket.socket(fileno=int(settings["channel"]))
    asyncio.run(_serve(profile, str(settings["link"]), channel, int(settings["index"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
