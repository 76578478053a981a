"""Relay workers ask the main process to attach and release their TAP ports.

The main process already holds the link backend the profile chose (pyroute2 for netlink: about
11 MB in every process that imports it); a worker only opens TAPs, and sends each link change
it needs over a SOCK_SEQPACKET pair of its own, one request at a time, from its attach thread:

    worker -> main   b"A" tap b"\\0" bridge         attach_port(tap, bridge)
                     b"R" tap b"\\0" tap ...        release_ports([tap, ...]), RELEASE_BATCH at most
    main -> worker   b"+"                           done
                     b"!" message                   failed: BackendError(message) in the worker

So every change to the host's links goes through the one backend the journal names, and a
worker holds nothing but its TAP fds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
from collections.abc import Callable

from wsnic.errors import BackendError

log = logging.getLogger("wsnic.relay")

AttachPort = Callable[[str, str], None]
ReleasePorts = Callable[[list[str]], None]

RELEASE_BATCH = 512  # TAP names per release request: 8 KiB, well inside a socket's buffer
MESSAGE_MAX = 16 * 1024
REPLY_WAIT = 60.0  # seconds a worker waits for the main process to answer


class LinkClient:
    """The worker's side: blocking calls, made from one thread at a time (the attach thread)."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        channel.settimeout(REPLY_WAIT)

    def attach_port(self, tap: str, bridge: str) -> None:
        self._ask(b"A" + tap.encode() + b"\0" + bridge.encode())

    def release_ports(self, taps: list[str]) -> None:
        for start in range(0, len(taps), RELEASE_BATCH):
            self._ask(b"R" + b"\0".join(t.encode() for t in taps[start : start + RELEASE_BATCH]))

    def _ask(self, request: bytes) -> None:
        try:
            self.channel.send(request)
            reply = self.channel.recv(MESSAGE_MAX)
        except TimeoutError:
            raise BackendError(f"the main process did not answer within {REPLY_WAIT:g} s") \
                from None
        except OSError as exc:
            raise BackendError(f"cannot reach the main process: {exc.strerror}") from exc
        if reply == b"+":
            return
        if reply[:1] == b"!":
            raise BackendError(reply[1:].decode(errors="replace"))
        raise BackendError("the main process is gone" if not reply else
                           f"unexpected answer from the main process: {reply[:40]!r}")

    def close(self) -> None:
        self.channel.close()


class LinkServer:
    """The main process's side: runs each worker's requests on the link backend, one at a time
    on a thread of its own (a backend call may run a command), and answers."""

    def __init__(self, attach_port: AttachPort, release_ports: ReleasePorts) -> None:
        self.attach_port = attach_port
        self.release_ports = release_ports
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="wsnic-links"
        )
        self._channels: list[socket.socket] = []

    def serve(self, loop: asyncio.AbstractEventLoop, channel: socket.socket, name: str) -> None:
        channel.setblocking(False)
        self._channels.append(channel)
        loop.add_reader(channel.fileno(), self._readable, loop, channel, name)

    def _readable(self, loop: asyncio.AbstractEventLoop, channel: socket.socket,
                  name: str) -> None:
        try:
            request = channel.recv(MESSAGE_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            request = b""
        if not request:  # the worker is gone; its pool notices on the other channel
            loop.remove_reader(channel.fileno())
            return
        future = loop.run_in_executor(self._pool, self._carry_out, request, name)
        future.add_done_callback(lambda done: self._answer(channel, done))

    def _carry_out(self, request: bytes, name: str) -> bytes:
        kind, names = request[:1], [n.decode() for n in request[1:].split(b"\0")]
        try:
            if kind == b"A" and len(names) == 2:
                self.attach_port(names[0], names[1])
            elif kind == b"R":
                self.release_ports(names)
            else:
                return b"!unknown request " + request[:20]
        except Exception as exc:  # the worker raises it, with its context, where it asked
            log.debug("link request from %s failed: %s", name, exc)
            return b"!" + str(exc).encode()[: MESSAGE_MAX - 1]
        return b"+"

    @staticmethod
    def _answer(channel: socket.socket, done: asyncio.Future[bytes]) -> None:
        if done.cancelled() or channel.fileno() < 0:
            return
        with contextlib.suppress(OSError):  # a worker that went away needs no answer
            channel.send(done.result())

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        for channel in self._channels:
            if channel.fileno() >= 0:
                with contextlib.suppress(ValueError, OSError):
                    loop.remove_reader(channel.fileno())
                channel.close()
        self._channels.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
