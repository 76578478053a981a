"""Per-client policy and counters, without I/O.

A Session is told what happened (bytes heard, a data frame received, a frame dropped) and what
time it is; it answers what to do (forward this payload, ping, drop the client). The asyncio glue
in server.py does the I/O. Time is always passed in, so tests drive it with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from wsnic.relay.frames import Drop, check_frame

# WebSocket data opcodes (RFC 6455 section 5.2); control frames never reach the session.
OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2

Payload = bytes | bytearray | memoryview


def _no_drops() -> dict[Drop, int]:
    return dict.fromkeys(Drop, 0)


@dataclass
class Counters:
    """Frames and bytes relayed, and frames dropped by reason.

    "in" is from the client towards the TAP, "out" from the TAP towards the client.
    """

    frames_in: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    drops: dict[Drop, int] = field(default_factory=_no_drops)

    def add(self, other: Counters) -> None:
        self.frames_in += other.frames_in
        self.bytes_in += other.bytes_in
        self.frames_out += other.frames_out
        self.bytes_out += other.bytes_out
        for reason, n in other.drops.items():
            self.drops[reason] += n

    def as_dict(self) -> dict[str, int]:
        out = {
            "frames_in": self.frames_in,
            "bytes_in": self.bytes_in,
            "frames_out": self.frames_out,
            "bytes_out": self.bytes_out,
        }
        out.update({f"drop_{reason.value}": n for reason, n in self.drops.items()})
        return out

    def describe(self) -> str:
        dropped = " ".join(f"{r.value}={n}" for r, n in self.drops.items() if n) or "none"
        return (
            f"from client {self.frames_in} frames/{self.bytes_in} B, "
            f"to client {self.frames_out} frames/{self.bytes_out} B, dropped {dropped}"
        )


class Phase(Enum):
    HANDSHAKE = "handshake"  # TCP (or TLS) up, waiting for a complete HTTP request
    ATTACHING = "attaching"  # upgrade accepted, TAP being attached to the bridge
    OPEN = "open"  # relaying frames
    CLOSED = "closed"


class IdleAction(Enum):
    NONE = "none"
    PING = "ping"
    DROP_HANDSHAKE = "drop_handshake"  # no complete upgrade request in time
    DROP_IDLE = "drop_idle"  # silent for ping_timeout seconds, pings unanswered


@dataclass(frozen=True)
class Policy:
    max_frame_size: int
    ping_interval: float
    ping_timeout: float
    handshake_timeout: float


class Session:
    """One client: its phase, counters, idle clock and fragment reassembly."""

    __slots__ = (
        "_frag",
        "_frag_drop",
        "_frag_text",
        "counters",
        "last_heard",
        "last_ping",
        "mac",
        "network",
        "peer",
        "phase",
        "policy",
        "started",
        "tap",
    )

    def __init__(self, peer: str, policy: Policy, now: float) -> None:
        self.peer = peer
        self.policy = policy
        self.phase = Phase.HANDSHAKE
        self.started = now
        self.last_heard = now
        self.last_ping = now
        self.network = ""
        self.tap = ""
        self.mac = ""
        self.counters = Counters()
        # Reassembly of a fragmented message: the bytes so far, its kind and whether it is
        # already known to be dropped (then its bytes are not kept).
        self._frag: bytearray | None = None
        self._frag_text = False
        self._frag_drop: Drop | None = None

    # --- time -------------------------------------------------------------------------------

    def heard(self, now: float) -> None:
        """Any bytes from the client count as a sign of life (data, pong, ping)."""
        self.last_heard = now

    def idle_action(self, now: float) -> IdleAction:
        """What the periodic check must do with this client now. PING updates last_ping."""
        policy = self.policy
        if self.phase is Phase.HANDSHAKE:
            if now - self.started >= policy.handshake_timeout:
                return IdleAction.DROP_HANDSHAKE
            return IdleAction.NONE
        if self.phase is not Phase.OPEN:
            return IdleAction.NONE
        silent = now - self.last_heard
        if silent >= policy.ping_timeout:
            return IdleAction.DROP_IDLE
        if silent >= policy.ping_interval and now - self.last_ping >= policy.ping_interval:
            self.last_ping = now
            return IdleAction.PING
        return IdleAction.NONE

    # --- frames from the client -------------------------------------------------------------

    def on_data(self, opcode: int, data: Payload, fin: bool) -> Payload | None:
        """A data frame from the client; return a complete ethernet frame to write, or None.

        Text messages, runts, oversized and bad frames are counted and swallowed. Fragmented
        messages are reassembled; their buffer never grows past max_frame_size.
        """
        if opcode == OP_BINARY and fin and self._frag is None:
            # The common case: one unfragmented binary message.
            reason = check_frame(data, self.policy.max_frame_size)
            if reason is None:
                return data
            self.counters.drops[reason] += 1
            return None
        if opcode == OP_CONT:
            return self._continue(data, fin)
        # The first frame of a message (binary or text), fragmented or not.
        self._frag = None
        if opcode == OP_TEXT:
            if fin:
                self.counters.drops[Drop.TEXT] += 1
                return None
            self._start(b"", text=True, drop=Drop.TEXT)
            return None
        self._start(data, text=False, drop=None)
        return None

    def _start(self, data: Payload, *, text: bool, drop: Drop | None) -> None:
        self._frag = bytearray()
        self._frag_text = text
        self._frag_drop = drop
        self._append(data)

    def _append(self, data: Payload) -> None:
        assert self._frag is not None
        if self._frag_drop is not None:
            return
        if len(self._frag) + len(data) > self.policy.max_frame_size:
            self._frag_drop = Drop.OVERSIZED
            self._frag = bytearray()  # free what was gathered; the rest is ignored
            return
        self._frag += data

    def _continue(self, data: Payload, fin: bool) -> Payload | None:
        if self._frag is None:
            # The protocol layer rejects a stray continuation; be safe anyway.
            return None
        self._append(data)
        if not fin:
            return None
        frame, drop = bytes(self._frag), self._frag_drop
        self._frag = None
        if drop is None:
            drop = check_frame(frame, self.policy.max_frame_size)
        if drop is not None:
            self.counters.drops[drop] += 1
            return None
        return frame

    # --- accounting by the glue -------------------------------------------------------------

    def drop(self, reason: Drop, count: int = 1) -> None:
        self.counters.drops[reason] += count

    def summary(self, reason: str, now: float) -> str:
        """The line logged when the client leaves."""
        where = f"network {self.network or '-'}, {self.tap or 'no TAP'}"
        if self.mac:
            where += f" {self.mac}"
        return (
            f"{self.peer} left after {now - self.started:.1f} s ({reason}); {where}; "
            f"{self.counters.describe()}"
        )
