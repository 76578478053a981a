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
    SENDER_MEMORY,
    SLOT_ENTRIES,
    FairShareBoard,
    SinkShare,
    TokenBucket,
)

SINK = bytes.fromhex("020000000009")
OTHER = bytes.fromhex("02000000000a")


def frames_from(*senders: int, to: bytes = SINK) -> list[bytes]:
    return [to + bytes.fromhex(f"0200000000{s:02x}") + b"\x88\xb5" + bytes(46) for s in senders]


def test_boards_of_two_processes_see_each_others_limits() -> None:
    fd = FairShareBoard.create_shared(2)
    first = FairShareBoard.attach(os.dup(fd), 0, 2)
    second = FairShareBoard.attach(fd, 1, 2)
    try:
        assert first.limits() == {} and second.limits() == {}
        first.publish({SINK: 1000.0})
        second.publish({SINK: 400.0, OTHER: 70.0})
        # the strictest limit on a MAC wins, wherever it was published
        assert first.limits() == second.limits() == {SINK: 400.0, OTHER: 70.0}
        second.publish({})
        assert first.limits() == {SINK: 1000.0}
    finally:
        first.close()
        second.close()


def test_a_slot_keeps_only_the_strictest_entries() -> None:
    board = FairShareBoard.private()
    many = {bytes([2, 0, 0, 0, n // 256, n % 256]): float(1000 - n) for n in range(100)}
    board.publish(many)
    kept = board.limits()
    assert len(kept) == SLOT_ENTRIES
    assert sorted(kept.values()) == sorted(sorted(many.values())[:SLOT_ENTRIES])


def test_a_slot_being_written_is_skipped() -> None:
    board = FairShareBoard.private()
    board.publish({SINK: 500.0})
    board.memory[0:4] = (3).to_bytes(4, "little")  # odd sequence: a writer is in the middle
    assert board.limits() == {}


def test_a_slot_outside_the_board_is_refused() -> None:
    fd = FairShareBoard.create_shared(1)
    with pytest.raises(ValueError, match="slot 1 of 1"):
        FairShareBoard.attach(fd, 1, 1)


def drain(share: SinkShare, frames: list[bytes], *, seconds: float, dropped: int) -> bool:
    share.drained += len(frames)
    if share.observing:
        share.observe(frames)
    return share.tick(seconds, dropped)


def test_senders_get_the_drained_rate_split_evenly_while_the_kernel_drops() -> None:
    share = SinkShare()
    # The first tick only tells that the kernel drops: the MACs are looked at from now on.
    assert drain(share, frames_from(1, 2, 3, 4) * 100, seconds=0.05, dropped=5000)
    assert share.rate is None and share.observing
    assert drain(share, frames_from(1, 2, 3, 4) * 100, seconds=0.05, dropped=5000)
    assert share.rate == pytest.approx(400 / 0.05 / 4)
    assert share.destinations == {SINK}
    # Still dropping: the rate goes below the fair share of what was drained.
    drain(share, frames_from(1, 2, 3, 4) * 100, seconds=0.05, dropped=800)
    assert share.rate == pytest.approx(400 / 0.05 / 4 * DECREASE)


def test_a_lone_sender_is_never_limited() -> None:
    share = SinkShare()
    for _ in range(5):
        drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000)
        assert share.rate is None
    assert share.observing


def test_a_starved_sender_counts_while_it_gets_the_odd_frame_through() -> None:
    share = SinkShare()
    drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000)
    drain(share, frames_from(1) * 500 + frames_from(2), seconds=0.05, dropped=10_000)
    for _ in range(SENDER_MEMORY - 1):  # sender 2 silent, but recently seen
        drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000)
    assert share.rate is not None
    drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000)
    drain(share, frames_from(1) * 500, seconds=0.05, dropped=10_000)
    assert share.rate is None  # sender 2 is gone: one sender left, nothing to be fair about


def test_losing_under_one_percent_is_a_burst_not_congestion() -> None:
    share = SinkShare()
    drain(share, frames_from(1, 2) * 500, seconds=0.05, dropped=100)
    drain(share, frames_from(1, 2) * 500, seconds=0.05, dropped=5)
    assert share.rate is None


def test_the_limit_grows_without_loss_and_is_lifted_once_it_no_longer_binds() -> None:
    share = SinkShare()
    drain(share, frames_from(1, 2) * 100, seconds=0.05, dropped=1000)
    drain(share, frames_from(1, 2) * 100, seconds=0.05, dropped=1000)
    first = share.rate
    assert first is not None
    drain(share, frames_from(1, 2) * 100, seconds=0.05, dropped=0)
    assert share.rate == pytest.approx(first * INCREASE)
    # The senders stopped: nothing drained, no loss; after QUIET_TICKS the limit goes, and
    # then there is nothing left to watch.
    watching = True
    for _ in range(QUIET_TICKS):
        watching = drain(share, [], seconds=0.05, dropped=0)
    assert share.rate is None and share.destinations == set()
    assert not watching


def test_the_limit_never_shuts_a_sender_out() -> None:
    share = SinkShare()
    drain(share, frames_from(1, 2), seconds=0.05, dropped=1000)
    for _ in range(50):
        drain(share, frames_from(1, 2), seconds=1.0, dropped=1000)
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
