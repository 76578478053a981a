"""The data plane: WebSocket clients <-> TAP ports on the networks' bridges, on asyncio.

One `_Connection` (an asyncio.Protocol) per TCP connection drives a websockets sans-I/O
ServerProtocol. The hot paths do no per-frame await or task:

* TAP -> client: `loop.add_reader` on the TAP fd; each wake-up reads frames until EAGAIN (at most
  READ_BATCH) and hands all of them to the transport in one `writelines`. While the transport's
  buffer is above its high-water mark (pause_writing) frames are read and dropped, as a full NIC
  queue would, so memory per client stays bounded. Reading from that client pauses too: what it
  sends may call for answers (a pong for every ping) that it does not read either.
* client -> TAP: every binary message is written with one os.write; a TAP that cannot take it
  (EAGAIN/ENOBUFS) drops the frame. Towards a client whose TAP queue backs up, each sender gets
  a fair share and what is over it is dropped first (`wsnic.relay.fairness`).

One periodic timer serves every connection: handshake deadline, idle pings and timeouts, and the
grace period of connections that are closing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

try:  # websockets' C helper when it was built, else its pure-Python one
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from wsnic.errors import BackendError, ConfigError
from wsnic.relay import http as answers
from wsnic.relay.fairness import (
    OBSERVE_FRAMES,
    WATCH,
    FairShareBoard,
    SinkShare,
    TapDrops,
    TokenBucket,
)
from wsnic.relay.fairness import TICK as FAIR_TICK
from wsnic.relay.frames import Drop, is_fast_binary, split_client_frames, ws_binary_header
from wsnic.relay.session import OP_BINARY, Counters, IdleAction, Phase, Policy, Session
from wsnic.relay.settings import RelaySettings
from wsnic.relay.tap import open_tap

log = logging.getLogger("wsnic.relay")

AttachPort = Callable[[str, str], None]
ReleasePorts = Callable[[list[str]], None]
TapOpener = Callable[[str], tuple[int, str, str]]

# Transport buffer bounds towards one client: above HIGH, frames to it are dropped and reading
# from it pauses; above CAP (which that pause should make unreachable) the connection is aborted.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
WRITE_CAP = 4 * WRITE_HIGH
# One read returns one frame, whatever its size; a smaller read would truncate it.
TAP_READ = 65535
# Unsent bytes the kernel may hold for one client (see _tune_socket), and bytes read from one
# client per wake-up.
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
NOTSENT_LOWAT = 128 * 1024
READ_CHUNK = 32 * 1024
# Frames read from one TAP per wake-up; the reader is level-triggered, so the rest follows on
# the next loop iteration after other clients had their turn.
READ_BATCH = 512
# Messages above max_frame_size are dropped and counted; above this multiple of it the protocol
# layer refuses to buffer them at all and closes the connection (1009).
HARD_LIMIT_FACTOR = 4
# Frames that arrive pipelined behind the upgrade request, kept while the TAP is attached.
MAX_PENDING = 64
# How long a closing connection may take to flush before it is aborted.
CLOSE_GRACE = 2.0
ATTACH_WAIT = 10.0

_DATA_OPCODES = (Opcode.CONT, Opcode.TEXT, Opcode.BINARY)
# The protocol's size of the fragmented message in progress (None between messages); the
# attribute's name changed across websockets versions.
_FRAGMENT_SIZE = "current_size" if hasattr(ServerProtocol(), "current_size") else "cur_size"
_TAP_FULL_ERRNOS = (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM, errno.EIO)
# Why reading from a client is paused; it resumes when no reason is left.
_ATTACHING = "attaching"  # frames wait in the socket until the TAP is on its bridge
_WRITING = "writing"  # the client does not read what it is sent


class _QuietLog(logging.LoggerAdapter[logging.Logger]):
    """websockets logs every open and close at INFO; the relay logs richer lines itself."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING or self.logger.isEnabledFor(logging.DEBUG):
            super().log(level, msg, *args, **kwargs)


_protocol_log = _QuietLog(logging.getLogger("wsnic.relay.websockets"), {})


def _first_offered(_: ServerProtocol, offered: Any) -> Subprotocol | None:
    # Browsers fail the handshake when they offered a subprotocol and get none back; the frame
    # format does not depend on it, so accept whatever the client calls it.
    return offered[0] if offered else None


def _tune_socket(transport: asyncio.Transport) -> None:
    """Bound the two queues that would otherwise hide frames from the drop policy.

    TCP_NOTSENT_LOWAT: the kernel keeps at most this much unsent data (in-flight data, which
    a long fat path needs, is not limited), so a slow reader's backlog stays in the transport
    buffer, where it is bounded and dropped, instead of seconds of frames in a socket buffer
    that autotuning grew to megabytes. A smaller read size per wake-up (where the transport
    allows setting it) keeps one flooding client from holding the loop for milliseconds while
    other clients' TAPs wait."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT)
    if hasattr(transport, "max_size"):
        transport.max_size = READ_CHUNK


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer or "unknown")


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: HTTP upgrade, then frames both ways."""

    def __init__(self, server: RelayServer, tls: bool, refuse: bool = False) -> None:
        self.server = server
        self.tls = tls
        self.refuse = refuse  # the acceptor found the server full: answer 503
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.protocol = ServerProtocol(
            max_size=server.protocol_max_size,
            select_subprotocol=_first_offered,
            logger=_protocol_log,
        )
        self.session = Session("?", server.policy, self.loop.time())
        self.tap_fd: int | None = None
        self.attaching = False
        self.attach_future: asyncio.Future[None] | None = None
        self.paused = False  # the transport's buffer is over WRITE_HIGH
        self.read_pauses: set[str] = set()
        self.closing = False
        self.close_deadline = 0.0
        self.reason = ""
        self.pending: list[Frame] = []
        # Set once the WebSocket is open and the protocol is known to stand at a frame
        # boundary: from then on data_received cuts frames itself (_split_and_relay).
        self.fast = False
        self.clean_boundary = False
        self.inbuf = b""
        self.max_frame = server.policy.max_frame_size
        self.share: SinkShare | None = None  # set while this client's TAP queue backs up
        self.tap_drops: TapDrops | None = None  # the kernel's drop count at the TAP, with share
        self.kernel_drops = 0  # its value at the last fairness tick
        self.buckets: dict[bytes, TokenBucket] | None = None  # per policed destination

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio's.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        _tune_socket(transport)
        self.session.peer = _peer_name(transport)
        self.server.connections.add(self)
        self.server.stats["connections"] += 1
        if self.server.stopping:
            self.close("server stopping")

    def data_received(self, data: bytes) -> None:
        self.session.last_heard = self.loop.time()
        try:
            if self.fast:
                self._split_and_relay(data)
            else:
                self._to_protocol(data)
            self._flush()
        except Exception:
            log.exception("%s: unexpected error; dropping this client", self.session.peer)
            self.abort("internal error")

    def _to_protocol(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        if events:
            self._handle(events)

    def _split_and_relay(self, data: bytes) -> None:
        """The hot path once the WebSocket is open: cut complete frames here, unmask final
        binary ones and write them to the TAP; hand any other frame, whole, to the protocol
        (pings, close, text, fragments), which thus stays at a frame boundary. The websockets
        parser costs ~2.5 us a frame; this ~0.5 us."""
        buf = self.inbuf + data if self.inbuf else data
        limit = self.server.protocol_max_size
        frames, used, passthrough = split_client_frames(buf, limit)
        protocol = self.protocol
        session = self.session
        for start, end, head in frames:
            fragmenting = getattr(protocol, _FRAGMENT_SIZE) is not None
            if not fragmenting and is_fast_binary(buf, start, end, head, limit):
                frame = session.on_data(OP_BINARY, apply_mask(buf[head:end], buf[head - 4 : head]),
                                        True)
                if frame is not None:
                    self._to_tap(frame)
            else:
                self._to_protocol(buf[start:end])
        if passthrough:
            self.fast, self.inbuf = False, b""
            self._to_protocol(buf[used:])
        else:
            self.inbuf = buf[used:]

    def eof_received(self) -> bool | None:
        if not self.reason and self.protocol.state is State.OPEN:
            self.reason = "client closed the TCP connection without a close frame"
        try:
            self.protocol.receive_eof()
            self._flush()
        except Exception:
            log.exception("%s: unexpected error at EOF", self.session.peer)
        return False  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._release_tap()
        self.server.connections.discard(self)
        self.server.policing.discard(self)
        for senders in self.server.sending.values():
            senders.discard(self)
        session = self.session
        if not self.reason:
            self.reason = f"connection lost: {exc}" if exc else "connection closed"
        now = self.loop.time()
        if session.tap:
            log.info("%s", session.summary(self.reason, now))
        else:
            log.debug("%s: closed before the upgrade (%s)", session.peer, self.reason)
        session.phase = Phase.CLOSED
        self.server.departed(session.counters)
        if self.server.on_connection_closed is not None:
            self.server.on_connection_closed()

    def pause_writing(self) -> None:
        self.paused = True
        self._pause_reading(_WRITING)

    def resume_writing(self) -> None:
        self.paused = False
        self._resume_reading(_WRITING)

    def _pause_reading(self, reason: str) -> None:
        if not self.read_pauses and self.transport is not None:
            self.transport.pause_reading()
        self.read_pauses.add(reason)

    def _resume_reading(self, reason: str) -> None:
        pauses = self.read_pauses
        if reason not in pauses:
            return
        pauses.discard(reason)
        if not pauses and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- WebSocket events -------------------------------------------------------------------

    def _handle(self, events: list[Any]) -> None:
        session = self.session
        for event in events:
            if event.__class__ is Frame:
                opcode = event.opcode
                if opcode in _DATA_OPCODES:
                    if session.phase is not Phase.OPEN:
                        self._hold(event)
                        continue
                    frame = session.on_data(opcode, event.data, event.fin)
                    if frame is not None:
                        self._to_tap(frame)
                elif opcode is Opcode.CLOSE:
                    close = self.protocol.close_rcvd
                    self._client_left(f"closed by client ({close})" if close else "closed")
                # PING is answered by the protocol itself; PONG only proves life (last_heard).
            elif isinstance(event, Request):
                self._on_request(event)

    def _hold(self, frame: Frame) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append(frame)
        else:
            self.session.drop(Drop.TAP_FULL)

    def _to_tap(self, frame: Any) -> None:
        fd = self.tap_fd
        if fd is None:
            return  # closing: the client's last words have nowhere to go
        if self.server.limits and not self._within_share(frame):
            self.session.drop(Drop.POLICED)
            return
        try:
            os.write(fd, frame)
        except OSError as exc:
            if exc.errno in _TAP_FULL_ERRNOS:
                self.session.drop(Drop.TAP_FULL)
            else:
                self.close(f"writing to {self.session.tap} failed: {exc.strerror}")
            return
        counters = self.session.counters
        counters.frames_in += 1
        counters.bytes_in += len(frame)

    def _within_share(self, frame: Any) -> bool:
        """False when `frame` goes to a destination that backs up and this client is over its
        share towards it (see wsnic.relay.fairness)."""
        destination = bytes(frame[:6])
        server = self.server
        rate = server.limits.get(destination)
        if rate is None:
            return True
        senders = server.sending.get(destination)
        if senders is None:
            senders = server.sending[destination] = set()
        senders.add(self)
        if rate == WATCH:
            return True
        now = self.session.last_heard  # set when these frames arrived
        buckets = self.buckets
        if buckets is None:
            buckets = self.buckets = {}
            self.server.policing.add(self)
        bucket = buckets.get(destination)
        if bucket is None:
            bucket = buckets[destination] = TokenBucket(rate, now)
        return bucket.admit(rate, now)

    def _flush(self) -> None:
        """Send what the protocol produced; an empty chunk means: close the connection."""
        writes = self.protocol.data_to_send()
        if not writes or self.transport is None:
            return
        chunks = [w for w in writes if w]
        if chunks:
            transport = self.transport
            transport.writelines(chunks)
            if self.paused and transport.get_write_buffer_size() > WRITE_CAP:
                self._overflow(transport.get_write_buffer_size())
                return
        if len(chunks) != len(writes):
            self._on_protocol_eof()

    def _overflow(self, size: int) -> None:
        self.server.stats["write_overflows"] += 1
        log.warning("%s: %d bytes wait for a client that does not read them; dropping it",
                    self.session.peer, size)
        self.abort(f"send buffer over {WRITE_CAP} bytes: the client does not read")

    def _on_protocol_eof(self) -> None:
        protocol = self.protocol
        if not self.reason:
            if protocol.handshake_exc is not None and protocol.state is State.CONNECTING:
                cause = protocol.handshake_exc.__cause__ or protocol.handshake_exc
                self.reason = f"no valid HTTP request: {cause}"
                self.server.stats["bad_requests"] += 1
            elif protocol.parser_exc is not None:
                self.reason = f"protocol error: {protocol.parser_exc}"
                if isinstance(protocol.parser_exc, PayloadTooBig):
                    self.session.drop(Drop.OVERSIZED)
            elif protocol.close_rcvd is not None:
                self.reason = f"closed by client ({protocol.close_rcvd})"
            else:
                self.reason = "connection closed"
        self._release_tap()
        self._start_closing()

    # --- upgrade ----------------------------------------------------------------------------

    def _on_request(self, request: Request) -> None:
        server = self.server
        session = self.session
        # Nothing arrived behind the request: the protocol's parser waits at a frame boundary,
        # so the hot path may take over once the upgrade is done (see _split_and_relay).
        self.clean_boundary = not getattr(self.protocol.reader, "buffer", b"x")
        path = request.path.split("?", 1)[0]  # the query may carry a token: never logged
        if server.settings.trust_proxy:
            forwarded = answers.forwarded_for(request)
            if forwarded:
                session.peer = f"{forwarded} (via {session.peer})"
        if server.stopping:
            self.reason = "server stopping"
            self.protocol.send_response(answers.unavailable(server.settings.max_clients))
            return
        clients = server.settings.max_clients if self.refuse else server.client_count
        decision = answers.answer(self.protocol, request, server.settings, clients)
        if decision.network is None:
            status = decision.response.status_code
            server.stats[f"refused_{status}"] = server.stats.get(f"refused_{status}", 0) + 1
            self.reason = f"refused with HTTP {status}: {decision.why}"
            log.info("%s: %s %s refused with HTTP %d: %s", session.peer, request.method,
                     path, status, decision.why)
            self.protocol.send_response(decision.response)
            return
        network = decision.network
        try:
            fd, tap, mac = server.tap_opener(server.settings.tap_name)
        except Exception as exc:
            log.error("%s: cannot create a TAP: %s", session.peer, exc)
            server.stats["failed_setup"] += 1
            self.reason = f"no TAP: {exc}"
            self.protocol.send_response(answers.internal_error())
            return
        self.tap_fd = fd
        server.tap_holders += 1
        session.phase = Phase.ATTACHING
        session.network, session.tap, session.mac = network.name, tap, mac
        self.attaching = True
        server.attaching.add(self)
        self._pause_reading(_ATTACHING)
        future = server.attach(tap, network.bridge)
        self.attach_future = future
        future.add_done_callback(
            lambda done: self._attached(done, decision.response, network.bridge, path)
        )

    def _attached(self, done: asyncio.Future[None], response: Any, bridge: str,
                  path: str) -> None:
        self.attaching = False
        self.server.attaching.discard(self)
        session = self.session
        try:
            if self.closing or self.transport is None or self.transport.is_closing():
                self._release_tap()
                return
            exc = done.exception() if not done.cancelled() else asyncio.CancelledError()
            if exc is not None:
                log.error("%s: attaching %s to %s failed: %s", session.peer, session.tap,
                          bridge, exc)
                self.server.stats["failed_setup"] += 1
                self.reason = f"attaching {session.tap} to {bridge} failed"
                self._release_tap()
                self.protocol.send_response(answers.internal_error())
                self._flush()
                return
            self.protocol.send_response(response)
            session.phase = Phase.OPEN
            self.fast = self.clean_boundary and not self.pending
            now = self.loop.time()
            session.last_heard = session.last_ping = now
            self.server.stats["upgrades"] += 1
            assert self.tap_fd is not None
            self.loop.add_reader(self.tap_fd, self._on_tap_readable)
            log.info("%s connected on %s: network %s (%s), %s %s", session.peer, path,
                     session.network, bridge, session.tap, session.mac)
            self._flush()
            pending, self.pending = self.pending, []
            if pending:
                self._handle(pending)
                self._flush()
            self._resume_reading(_ATTACHING)
        except Exception:
            log.exception("%s: unexpected error after attaching", session.peer)
            self.abort("internal error")

    # --- TAP -> client ----------------------------------------------------------------------

    def _on_tap_readable(self) -> None:
        try:
            self._relay_from_tap()
        except Exception:
            log.exception("%s: unexpected error reading %s", self.session.peer, self.session.tap)
            self.abort("internal error")

    def _relay_from_tap(self) -> None:
        fd = self.tap_fd
        transport = self.transport
        if fd is None or transport is None:
            return
        out: list[bytes] = []
        nbytes = 0
        dropped = 0
        oversized = 0
        slow = self.paused
        read = os.read
        limit = self.max_frame
        most = TAP_READ
        backlog = False
        try:
            for _ in range(READ_BATCH):
                frame = read(fd, most)
                if slow:
                    dropped += 1
                    continue
                size = len(frame)
                if size > limit:
                    oversized += 1
                    continue
                out.append(ws_binary_header(size))
                out.append(frame)
                nbytes += size
            backlog = True  # READ_BATCH frames and no end in sight: the TAP queue backs up
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close(f"reading {self.session.tap} failed: {exc.strerror}")
            return
        share = self.share
        if backlog and share is None:
            self._watch_share()
            share = self.share
        if share is not None:
            share.drained += len(out) // 2
            if share.observing:
                share.observe(out[1 : 2 * OBSERVE_FRAMES : 2])
        counters = self.session.counters
        if out:
            transport.writelines(out)
            counters.frames_out += len(out) // 2
            counters.bytes_out += nbytes
        if dropped:
            counters.drops[Drop.CLIENT_SLOW] += dropped
        if oversized:
            counters.drops[Drop.OVERSIZED] += oversized

    def _watch_share(self) -> None:
        """The TAP queue backs up: watch whether the kernel drops, and which senders fill it."""
        if self.tap_drops is None:
            self.tap_drops = TapDrops(self.session.tap)
        dropped = self.tap_drops.read()
        if dropped is None:
            return  # no counter to go by: nothing to police with
        self.kernel_drops = dropped
        self.share = SinkShare()
        self.server.sharing.add(self)

    def _end_share(self) -> None:
        self.share = None
        self.server.sharing.discard(self)

    def _release_tap(self) -> None:
        """Stop relaying and close the TAP (the kernel removes it with the fd).

        While the attach runs in its thread, the fd stays open so that the TAP name cannot be
        reused by another client meanwhile; the attach callback closes it.
        """
        fd = self.tap_fd
        if fd is None or self.attaching:
            return
        self.tap_fd = None
        if self.tap_drops is not None:
            self.tap_drops.close()
            self.tap_drops = None
        self.server.tap_holders -= 1
        self.loop.remove_reader(fd)
        self.server.retire(fd, self.session.tap)

    # --- closing ----------------------------------------------------------------------------

    def _client_left(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self._release_tap()

    def close(self, reason: str, code: int = 1000) -> None:
        """Close politely: a close frame if the WebSocket is open, then the TCP connection."""
        if self.closing:
            return
        if not self.reason:
            self.reason = reason
        self._release_tap()
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason[:100])
        chunks = [w for w in self.protocol.data_to_send() if w]
        if chunks and self.transport is not None:
            self.transport.writelines(chunks)
        self._start_closing()

    def _start_closing(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_deadline = self.loop.time() + CLOSE_GRACE
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
        self._release_tap()
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def tick(self, now: float) -> None:
        if self.closing:
            if now >= self.close_deadline and self.transport is not None:
                self.transport.abort()  # the peer does not read what is left: give up
            return
        action = self.session.idle_action(now)
        if action is IdleAction.NONE:
            return
        if action is IdleAction.PING:
            self.protocol.send_ping(b"wsnic")
            self._flush()
        elif action is IdleAction.DROP_IDLE:
            self.close(f"idle timeout: silent for {now - self.session.last_heard:.1f} s", 1001)
        elif action is IdleAction.DROP_HANDSHAKE:
            self.close("no WebSocket upgrade in time")


class RelayServer:
    """Listen for WebSocket clients and give each one a TAP port on its network's bridge.

    `attach_port(tap, bridge)` enslaves a TAP to a bridge and brings it up; it runs on a worker
    thread (it may run a command), one call at a time, so it needs no thread safety.
    """

    def __init__(self, settings: RelaySettings, attach_port: AttachPort, *,
                 tap_opener: TapOpener = open_tap,
                 on_connection_closed: Callable[[], None] | None = None,
                 release_ports: ReleasePorts | None = None,
                 board: FairShareBoard | None = None) -> None:
        self.settings = settings
        # Fair shares towards clients whose TAP queue backs up: shared with the other relay
        # workers through `board`; `limits` is what every process published, read each tick.
        self.board = board if board is not None else FairShareBoard.private()
        self.limits: dict[bytes, float] = {}
        # the clients that sent to each watched destination this tick (published as counts)
        self.sending: dict[bytes, set[_Connection]] = {}
        self.sharing: set[_Connection] = set()  # clients whose TAP backs up (SinkShare)
        self.policing: set[_Connection] = set()  # clients with a token bucket
        self._published = False
        self._fair_timer: asyncio.TimerHandle | None = None
        self._fair_stamp = 0.0
        # Deletes departing TAPs in one batch (see LinkBackend.release_ports); without it each
        # TAP goes when its fd is closed, which costs the kernel ~20 ms apiece.
        self.release_ports = release_ports
        self._retiring: list[tuple[int, str]] = []
        self._retire_pending: asyncio.Handle | None = None
        self._retirements: set[asyncio.Future[None]] = set()
        # Set in a worker process: tells the acceptor that a connection it handed over ended.
        self.on_connection_closed = on_connection_closed
        self.attach_port = attach_port
        self.tap_opener = tap_opener
        srv = settings
        self.policy = Policy(
            max_frame_size=srv.max_frame_size,
            ping_interval=srv.ping_interval,
            ping_timeout=srv.ping_timeout,
            handshake_timeout=srv.ping_interval,
        )
        self.protocol_max_size = HARD_LIMIT_FACTOR * srv.max_frame_size
        self.tick_interval = max(0.05, min(1.0, srv.ping_interval / 4))
        self.connections: set[_Connection] = set()
        self.attaching: set[_Connection] = set()  # TAP open, attach_port running
        self.tap_holders = 0
        self.stopping = False
        self.stats: dict[str, int] = {
            "connections": 0, "upgrades": 0, "bad_requests": 0, "failed_setup": 0,
            "write_overflows": 0,
        }
        self._departed = Counters()
        self._servers: list[asyncio.Server] = []
        self._timer: asyncio.TimerHandle | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls_context: ssl.SSLContext | None = None
        self._adopting: set[asyncio.Task[None]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "RelayServer.start() was not called"
        return self._loop

    @property
    def client_count(self) -> int:
        """Clients holding a TAP (relaying, or being attached)."""
        return self.tap_holders

    @property
    def counters(self) -> Counters:
        """Totals over every client so far, those connected included."""
        total = Counters()
        total.add(self._departed)
        for conn in self.connections:
            total.add(conn.session.counters)
        return total

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        out: list[tuple[str, int]] = []
        for server in self._servers:
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((str(name[0]), int(name[1])))
        return out

    def departed(self, counters: Counters) -> None:
        self._departed.add(counters)

    def attach(self, tap: str, bridge: str) -> asyncio.Future[None]:
        assert self._pool is not None
        return self.loop.run_in_executor(self._pool, self.attach_port, tap, bridge)

    def retire(self, fd: int, tap: str) -> None:
        """Remove a departed client's TAP: gathered with the others that leave in the same
        loop iteration, deleted as one group on the attach thread, then the fds closed."""
        if self.release_ports is None or self._pool is None:
            os.close(fd)
            return
        self._retiring.append((fd, tap))
        if self._retire_pending is None:
            self._retire_pending = self.loop.call_soon(self._retire_batch)

    def _retire_batch(self) -> None:
        batch, self._retiring, self._retire_pending = self._retiring, [], None
        if not batch or self._pool is None:
            return
        future = self.loop.run_in_executor(self._pool, self._release_batch, batch)
        self._retirements.add(future)
        future.add_done_callback(self._retirements.discard)

    def _release_batch(self, batch: list[tuple[int, str]]) -> None:
        assert self.release_ports is not None
        try:
            self.release_ports([tap for _, tap in batch])
        except Exception as exc:  # closing the fds below removes them anyway, just slower
            log.warning("deleting %d departed TAPs at once failed: %s", len(batch), exc)
        finally:
            for fd, _ in batch:
                os.close(fd)

    # --- lifecycle --------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        certificate, key_file = self.settings.certificate, self.settings.private_key
        assert certificate is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(certificate, key_file)
        except (OSError, ssl.SSLError) as exc:
            key = f" with key {key_file}" if key_file else ""
            raise ConfigError(
                f"cannot load the TLS certificate {certificate}{key}: {exc}"
            ) from exc
        return context

    async def _listen(self, port: int, context: ssl.SSLContext | None) -> None:
        host = self.settings.address
        tls = context is not None
        try:
            server = await self.loop.create_server(
                lambda: _Connection(self, tls),
                host,
                port,
                reuse_address=True,
                ssl=context,
                ssl_handshake_timeout=self.policy.handshake_timeout if tls else None,
            )
        except OSError as exc:
            raise BackendError(
                f"cannot listen on {host}:{port} ({'wss' if tls else 'ws'}): {exc.strerror}"
            ) from exc
        self._servers.append(server)
        log.info("listening on %s://%s:%d", "wss" if tls else "ws", host, port)

    async def start(self, listen: bool = True) -> None:
        """Listen on ws_port, and on wss_port when a certificate is configured. A worker
        process does not listen (`listen=False`): it adopts sockets its acceptor accepted."""
        self._loop = asyncio.get_running_loop()
        srv = self.settings
        context = self._ssl_context() if srv.certificate is not None else None
        self._tls_context = context
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="wsnic-attach"
        )
        try:
            if listen:
                await self._listen(srv.ws_port, None)
                if context is not None:
                    await self._listen(srv.wss_port, context)
        except BaseException:
            await self.stop()
            raise
        self._timer = self.loop.call_later(self.tick_interval, self._tick)
        self._fair_stamp = self.loop.time()
        self._fair_timer = self.loop.call_later(FAIR_TICK, self._fair_tick)
        for net in self.settings.networks:
            log.info("network %s: path %s -> bridge %s", net.name, net.path, net.bridge)

    def adopt(self, sock: socket.socket, tls: bool, refuse: bool) -> None:
        """Serve a connection accepted elsewhere (by the acceptor of a worker pool)."""
        if tls and self._tls_context is None:  # the acceptor has a certificate, we have none
            sock.close()
            if self.on_connection_closed is not None:
                self.on_connection_closed()
            return

        async def adopt() -> None:
            try:
                await self.loop.connect_accepted_socket(
                    lambda: _Connection(self, tls, refuse), sock,
                    ssl=self._tls_context if tls else None,
                    ssl_handshake_timeout=self.policy.handshake_timeout if tls else None,
                )
            except Exception as exc:  # a failed TLS handshake, a peer that went away
                log.debug("adopting a connection failed: %s", exc)
                sock.close()
                if self.on_connection_closed is not None:
                    self.on_connection_closed()

        task = self.loop.create_task(adopt())
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def _tick(self) -> None:
        now = self.loop.time()
        for conn in list(self.connections):
            try:
                conn.tick(now)
            except Exception:
                log.exception("%s: unexpected error in the periodic check", conn.session.peer)
                conn.abort("internal error")
        self._timer = self.loop.call_later(self.tick_interval, self._tick)

    def _fair_tick(self) -> None:
        """Turn what the backed-up TAPs saw into per-sender rates, publish them, and take
        everybody's (see wsnic.relay.fairness)."""
        now = self.loop.time()
        seconds, self._fair_stamp = now - self._fair_stamp, now
        counted = self.board.read().senders  # as every relay published them last tick
        published: dict[bytes, float] = {}
        for conn in list(self.sharing):
            share = conn.share
            total = conn.tap_drops.read() if conn.tap_drops is not None else None
            if share is None or total is None:
                conn._end_share()
                continue
            was = share.limiting
            senders = max((counted.get(mac, 0) for mac in share.destinations), default=0)
            watching = share.tick(seconds, total - conn.kernel_drops, senders)
            conn.kernel_drops = total
            rate = share.rate
            if was and not share.limiting:
                log.info("%s: its TAP keeps up again; senders towards it are no longer "
                         "limited", conn.session.peer)
            elif share.limiting and not was:
                log.info("%s: its TAP backs up; each of %d senders towards it is limited to its "
                         "share, %.0f frames/s", conn.session.peer, senders, rate)
            if not watching:
                conn._end_share()
            if rate is None:
                continue
            for mac in share.destinations:
                published[mac] = min(rate, published.get(mac, rate))
        sending = {mac: len(conns) for mac, conns in self.sending.items()}
        self.sending = {}
        if published or sending or self._published:
            self.board.publish(published, sending)
            self._published = bool(published or sending)
        limits = self.board.read().limits
        if limits.keys() != self.limits.keys():
            for conn in self.policing:
                conn.buckets = None
            self.policing.clear()
        self.limits = limits
        self._fair_timer = self.loop.call_later(FAIR_TICK, self._fair_tick)

    async def stop(self) -> None:
        """Stop listening and close every client; every TAP is gone when this returns."""
        if self.stopping:
            return
        self.stopping = True
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._fair_timer is not None:
            self._fair_timer.cancel()
        if self._published:
            self.board.publish({}, {})
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close("server stopping", 1001)
        futures = [c.attach_future for c in self.attaching if c.attach_future is not None]
        if futures:
            await asyncio.wait(futures, timeout=ATTACH_WAIT)
            await asyncio.sleep(0)  # let the attach callbacks close their TAPs
        deadline = self.loop.time() + CLOSE_GRACE
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections) + list(self.attaching):
            conn.attaching = False  # a hung attach must not keep the TAP
            conn.abort("server stopping")
        self.attaching.clear()
        await asyncio.sleep(0)
        if self._retire_pending is not None:
            self._retire_pending.cancel()
            self._retire_batch()
        if self._retirements:
            await asyncio.wait(set(self._retirements), timeout=ATTACH_WAIT)
        for server in self._servers:
            # Python >= 3.12 also waits for connections still in their TLS handshake here.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_GRACE)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        total = self.counters
        log.info("relay stopped: %d connections, %d clients; %s", self.stats["connections"],
                 self.stats["upgrades"], total.describe())
