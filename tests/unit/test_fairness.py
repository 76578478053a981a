"""Fair shares towards a backed-up TAP: the shared board, the control law, the token bucket."""

from __future__ import annotations

import os

import pytest

from wsnic.relay.fairness import (
    DECREASE,
    INCREASE,
    MIN_BURST,
    MIN_RATE,
    QUIET_TICKS,
    SLOT_ENTRIES,
    WATCH,
    BoardView,
    FairShareBoard,
    SinkShare,
    TokenBucket,
)

SINK = bytes.fromhex("020000000009")
OTHER = bytes.fromhex("02000000000a")


def frames_from(*senders: int, to: bytes = SINK) -> list[bytes]:
    return [to + bytes.fromhex(f"0200000000{s:02x}") + b"\x88\xb5" + bytes(46) for s in senders]


def test_boards_of_two_processes_see_each_others_limits_and_senders() -> None:
    fd = FairShareBoard.create_shared(2)
    first = FairShareBoard.attach(os.dup(fd), 0, 2)
    second = FairShareBoard.attach(fd, 1, 2)
    try:
        assert first.read() == second.read() == BoardView()
        first.publish({SINK: 1000.0}, {SINK: 3})
        second.publish({SINK: 400.0, OTHER: WATCH}, {SINK: 2, OTHER: 1})
        # the strictest limit on a MAC wins, wherever it was published; senders add up
        expected = BoardView({SINK: 400.0, OTHER: WATCH}, {SINK: 5, OTHER: 1})
        assert first.read() == second.read() == expected
        second.publish({}, {})
        assert first.read() == BoardView({SINK: 1000.0}, {SINK: 3})
    finally:
        first.close()
        second.close()


def test_a_slot_keeps_the_strictest_limits_first() -> None:
    board = FairShareBoard.private()
    many = {bytes([2, 0, 0, 0, n // 256, n % 256]): float(1000 - n) for n in range(100)}
    board.publish(many, {SINK: 4})
    kept = board.read()
    assert len(kept.limits) == SLOT_ENTRIES and kept.senders == {}
    assert sorted(kept.limits.values()) == sorted(sorted(many.values())[:SLOT_ENTRIES])


def test_a_slot_being_written_is_skipped() -> None:
    board = FairShareBoard.private()
    board.publish({SINK: 500.0}, {})
    board.memory[0:4] = (3).to_bytes(4, "little")  # odd sequence: a writer is in the middle
    assert board.read() == BoardView()


def test_a_slot_outside_the_board_is_refused() -> None:
    fd = FairShareBoard.create_shared(1)
    with pytest.raises(ValueError, match="slot 1 of 1"):
        FairShareBoard.attach(fd, 1, 1)


def drain(share: SinkShare, frames: list[bytes], *, seconds: float, dropped: int,
          senders: int) -> bool:
    share.drained += len(frames)
    if share.observing:
        share.observe(frames)
    return share.tick(seconds, dropped, senders)


def test_senders_get_the_drained_rate_split_evenly_while_the_kernel_drops() -> None:
    share = SinkShare()
    # The first tick only tells that the kernel drops: the sink's MACs are looked at from now
    # on, and published to be watched: every relay counts who sends to them.
    assert drain(share, frames_from(1, 2) * 200, seconds=0.05, dropped=5000, senders=0)
    assert share.rate == WATCH and not share.limiting
    assert share.observing and share.destinations == set()
    assert drain(share, frames_from(1, 2) * 200, seconds=0.05, dropped=5000, senders=0)
    assert share.destinations == {SINK}
    # Four senders counted where they send, though two of them never got a frame through.
    assert drain(share, frames_from(1, 2) * 200, seconds=0.05, dropped=5000, senders=4)
    assert share.rate == pytest.approx(400 / 0.05 / 4) and share.limiting
    # Still dropping: the rate goes below the fair share of what was drained.
    drain(share, frames_from(1, 2, 3, 4) * 100, seconds=0.05, dropped=800, senders=4)
    assert share.rate == pytest.approx(400 / 0.05 / 4 * DECREASE)


def test_a_lone_sender_is_never_limited() -> None:
    share = SinkShare()
    for _ in range(5):
        drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000, senders=1)
        assert not share.limiting
    assert share.observing
    drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000, senders=2)
    assert share.limiting
    drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000, senders=1)
    assert share.rate == WATCH  # the other one left


def test_broadcasts_are_not_this_sinks_to_police() -> None:
    share = SinkShare(observing=True)
    multicast = bytes.fromhex("01005e000001")
    share.observe(frames_from(1, 2, to=b"\xff" * 6) + frames_from(3, to=multicast))
    assert share.destinations == set()


def test_losing_under_one_percent_is_a_burst_not_congestion() -> None:
    share = SinkShare()
    for _ in range(3):
        drain(share, frames_from(1, 2) * 500, seconds=0.05, dropped=9, senders=2)
    assert not share.limiting
    drain(share, frames_from(1, 2) * 500, seconds=0.05, dropped=11, senders=2)
    assert share.limiting


def test_the_limit_grows_without_loss_and_is_lifted_once_it_no_longer_binds() -> None:
    share = SinkShare()
    drain(share, frames_from(1, 2) * 100, seconds=0.05, dropped=1000, senders=2)
    first = share.rate
    assert first is not None and share.limiting
    drain(share, frames_from(1, 2) * 100, seconds=0.05, dropped=0, senders=2)
    assert share.rate == pytest.approx(first * INCREASE)
    # The senders stopped: nothing drained, no loss; after QUIET_TICKS the limit goes, and
    # then there is nothing left to watch.
    watching = True
    for _ in range(QUIET_TICKS):
        watching = drain(share, [], seconds=0.05, dropped=0, senders=0)
    assert share.rate is None and share.destinations == set()
    assert not watching


def test_the_limit_never_shuts_a_sender_out() -> None:
    share = SinkShare()
    for _ in range(50):
        drain(share, frames_from(1, 2), seconds=1.0, dropped=1000, senders=2)
    assert share.rate == MIN_RATE


def test_a_token_bucket_admits_its_rate_after_its_burst() -> None:
    bucket = TokenBucket(10_000.0, now=0.0)
    burst = sum(bucket.admit(10_000.0, 0.0) for _ in range(1000))
    assert burst == 50  # BURST_SECONDS (0.005) of 10k frames/s
    bucket = TokenBucket(1000.0, now=0.0)
    assert sum(bucket.admit(1000.0, 0.0) for _ in range(1000)) == MIN_BURST
    admitted = 0
    for step in range(1, 1001):  # one second, 100 frames offered every millisecond
        admitted += sum(bucket.admit(1000.0, step / 1000) for _ in range(100))
    assert admitted == pytest.approx(1000, abs=2)
