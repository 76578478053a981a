"""Fair shares for clients that flood one destination, across relay processes.

Frames from every client towards one client meet in that client's TAP queue, and the kernel
drops at its tail when the queue is full. Tail drop favours whoever writes right after the queue
was drained: a relay process that does nothing but write (its clients only send) keeps the queue
full, and the senders served by the process that drains the queue (the sink's own) lose nearly
every frame. No qdisc helps: tun never stops its queue, so nothing ever waits in one.

So the relay drops before the kernel does, fairly:

* The sink's relay notices a backlog: a read pass on its TAP ends at READ_BATCH frames instead
  of EAGAIN. From then on (`SinkShare`) it counts, per tick, the frames it drained and the frames
  the kernel dropped at the TAP's queue (its tx_dropped counter, `TapDrops`), and once the
  kernel drops, the unicast destination MACs of what it drains (the sink's own).
* It publishes those MACs on a `FairShareBoard` (shared memory, one slot per relay process):
  first with no limit (WATCH), which asks every relay to count its clients that send to them.
  The senders are counted where they send, not where their frames arrive: a sender that tail
  drop starves completely never shows up at the sink, yet it is one of those to be fair to.
* While the kernel drops more than LOSS of the frames and there is more than one sender, the
  per-sender rate is drained / senders (times DECREASE once set); each tick without such loss
  it grows by INCREASE, and it is lifted once it no longer binds. A backlog alone is no reason
  (the queue is there to absorb bursts), and neither is one sender alone: tail drop cannot be
  unfair to it.
* Every relay process reads the board each tick and polices what its clients send to those MACs
  with a token bucket per client and destination (`TokenBucket`); frames over the rate are
  dropped and counted as `policed` before they cost a TAP write.

The result is max-min fairness towards a congested destination, whatever process each sender
lives in; traffic to other destinations is never touched.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import socket
import struct
from dataclasses import dataclass, field

TICK = 0.05  # seconds between two updates of the board
DECREASE = 0.9  # the rate while the backlog lasts, times the fair share
INCREASE = 1.05  # per tick without backlog
QUIET_TICKS = 10  # ticks without loss, and the rate above everything drained: lifted
LOSS = 0.01  # of the frames towards the TAP: less is a burst, not congestion
WATCH = math.inf  # a published "rate" that limits nothing: count the senders, that is all
# Frames of each read pass whose destination MACs are looked at, and only once the kernel
# dropped: no per-frame cost while nothing is lost.
OBSERVE_FRAMES = 64
MIN_RATE = 50.0  # frames/s: a sender is never shut out
# A bucket holds this many seconds of its rate: a few reads' worth, and small enough that the
# senders' bursts together fit the TAP queue (1000 frames) instead of overflowing it again.
BURST_SECONDS = 0.005
MIN_BURST = 16.0

_HEADER = struct.Struct("=II")  # sequence (odd while the slot is being written), entries
# destination MAC, kind, value: frames/s per sender (_LIMIT) or clients sending to it (_SENDERS)
_ENTRY = struct.Struct("=6sBxd")
_LIMIT = 0
_SENDERS = 1
SLOT_ENTRIES = 32
SLOT_SIZE = _HEADER.size + SLOT_ENTRIES * _ENTRY.size
_READ_TRIES = 4


@dataclass
class BoardView:
    """What every relay published: the strictest limit per MAC, the senders per MAC in all."""

    limits: dict[bytes, float] = field(default_factory=dict)
    senders: dict[bytes, int] = field(default_factory=dict)


class FairShareBoard:
    """Per-destination limits and sender counts, one slot per relay process, read by every one.

    A slot is written only by its owner, under a sequence lock: the sequence is odd while the
    entries change, so a reader that sees it odd or changed reads again (or skips the slot this
    tick: the next one comes 50 ms later).
    """

    def __init__(self, memory: mmap.mmap, slot: int, slots: int) -> None:
        if not 0 <= slot < slots or len(memory) < slots * SLOT_SIZE:
            raise ValueError(f"slot {slot} of {slots} does not fit a board of {len(memory)} bytes")
        self.memory = memory
        self.slot = slot
        self.slots = slots
        self._sequence = 0

    @classmethod
    def private(cls) -> FairShareBoard:
        """A board for a relay that runs alone (one process)."""
        return cls(mmap.mmap(-1, SLOT_SIZE), 0, 1)

    @staticmethod
    def create_shared(slots: int) -> int:
        """A memory file for `slots` relay processes; pass the fd on and open it with `attach`."""
        fd = os.memfd_create("wsnic-fair-share", 0)
        os.ftruncate(fd, slots * SLOT_SIZE)
        return fd

    @classmethod
    def attach(cls, fd: int, slot: int, slots: int) -> FairShareBoard:
        """Map the memory file `fd` (and close it: the mapping keeps the memory)."""
        try:
            memory = mmap.mmap(fd, slots * SLOT_SIZE)
        finally:
            os.close(fd)
        return cls(memory, slot, slots)

    def publish(self, limits: dict[bytes, float], senders: dict[bytes, int]) -> None:
        """Replace this process's entries: its limits (the strictest first), then its sender
        counts, SLOT_ENTRIES at most in all."""
        entries = [(mac, _LIMIT, rate) for mac, rate in sorted(limits.items(),
                                                               key=lambda item: item[1])]
        entries += [(mac, _SENDERS, float(count)) for mac, count in senders.items()]
        entries = entries[:SLOT_ENTRIES]
        base = self.slot * SLOT_SIZE
        memory = self.memory
        self._sequence += 1  # odd: being written
        _HEADER.pack_into(memory, base, self._sequence, 0)
        offset = base + _HEADER.size
        for mac, kind, value in entries:
            _ENTRY.pack_into(memory, offset, mac, kind, value)
            offset += _ENTRY.size
        self._sequence += 1
        _HEADER.pack_into(memory, base, self._sequence, len(entries))

    def read(self) -> BoardView:
        """Every process's entries: a MAC limited by more than one gets the lowest rate, and
        its senders are added up."""
        view = BoardView()
        limits, senders = view.limits, view.senders
        memory = self.memory
        for slot in range(self.slots):
            base = slot * SLOT_SIZE
            for _ in range(_READ_TRIES):
                sequence, count = _HEADER.unpack_from(memory, base)
                if sequence & 1:
                    continue
                raw = memory[base + _HEADER.size : base + _HEADER.size + count * _ENTRY.size]
                if _HEADER.unpack_from(memory, base)[0] != sequence:
                    continue
                for mac, kind, value in _ENTRY.iter_unpack(raw):
                    if kind == _SENDERS:
                        senders[mac] = senders.get(mac, 0) + int(value)
                    elif value < limits.get(mac, math.inf):
                        limits[mac] = value
                    elif mac not in limits:
                        limits[mac] = value  # WATCH
                break
        return view

    def close(self) -> None:
        self.memory.close()


@dataclass
class SinkShare:
    """The per-sender rate towards one client whose TAP queue backs up (see the module doc).

    The relay feeds it what it reads from the TAP (`drained`, `backlog`, `sources`,
    `destinations`); `tick` turns one tick's worth into the rate to publish, or None when the
    destination no longer needs policing.
    """

    # None: nothing published; WATCH: senders are being counted; else frames/s per sender
    rate: float | None = None
    drained: int = 0  # frames read from the TAP this tick
    destinations: set[bytes] = field(default_factory=set)  # unicast destination MACs drained
    quiet: int = 0  # ticks in a row without loss
    observing: bool = False  # the kernel dropped in the last tick, or something is published

    def observe(self, frames: list[bytes]) -> None:
        """Note the unicast destination MACs of (a sample of) the frames drained."""
        destinations = self.destinations
        for frame in frames:
            if not frame[0] & 1:  # group addresses reach every port: not this sink's to police
                destinations.add(frame[:6])

    def tick(self, seconds: float, dropped: int, senders: int) -> bool:
        """One tick: `dropped` frames were lost at the TAP's queue since the last, and
        `senders` clients (counted by every relay) sent to its destinations. Sets `rate`;
        False once there is nothing left to watch (no loss for QUIET_TICKS, nothing published)."""
        drain_rate = self.drained / seconds if seconds > 0 else 0.0
        if dropped > LOSS * (self.drained + dropped):
            self.quiet = 0
            if senders < 2:
                self.rate = WATCH  # none, or one alone: count them, limit nobody
            elif self.rate is None or self.rate == WATCH:
                self.rate = max(MIN_RATE, drain_rate / senders)
            else:
                self.rate = max(MIN_RATE, min(self.rate, drain_rate / senders) * DECREASE)
        else:
            self.quiet += 1
            if self.rate is not None:
                if self.quiet >= QUIET_TICKS and self.rate >= drain_rate:
                    self.rate = None  # the limit no longer binds anybody (WATCH included)
                elif self.rate != WATCH:
                    self.rate *= INCREASE
        self.drained = 0
        self.observing = dropped > 0 or self.rate is not None
        if self.rate is None:
            self.destinations = set()
        return self.rate is not None or self.quiet < QUIET_TICKS

    @property
    def limiting(self) -> bool:
        return self.rate is not None and self.rate != WATCH


class TapDrops:
    """The kernel's count of frames dropped at a TAP's queue (tx_dropped), read from sysfs.

    sysfs shows the devices of the network namespace it was mounted in, which is not always
    this process's: the device's ifindex there must match the one this process sees, or the
    counter is not used (`read` returns None and the TAP is never policed for).
    """

    def __init__(self, tap: str) -> None:
        self.fd: int | None = None
        base = f"/sys/class/net/{tap}"
        with contextlib.suppress(OSError):
            with open(f"{base}/ifindex", "rb") as index:
                if int(index.read()) != socket.if_nametoindex(tap):
                    return
            self.fd = os.open(f"{base}/statistics/tx_dropped", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int | None:
        if self.fd is None:
            return None
        try:
            return int(os.pread(self.fd, 32, 0))
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class TokenBucket:
    """Admits frames at `rate` per second, with a burst of BURST_SECONDS of it."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.tokens = max(MIN_BURST, rate * BURST_SECONDS)
        self.stamp = now

    def admit(self, rate: float, now: float) -> bool:
        burst = max(MIN_BURST, rate * BURST_SECONDS)
        tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True
