"""Per-client policy: message reassembly, drops, counters and idle decisions (fake clock)."""

import pytest

from wsnic.relay.frames import Drop
from wsnic.relay.session import (
    OP_BINARY,
    OP_CONT,
    OP_TEXT,
    Counters,
    IdleAction,
    Phase,
    Policy,
    Session,
)

POLICY = Policy(max_frame_size=1514, ping_interval=30.0, ping_timeout=100.0,
                handshake_timeout=30.0)
FRAME = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x06" + bytes(46)


def open_session(now: float = 0.0) -> Session:
    s = Session("198.51.100.7:4242", POLICY, now)
    s.phase = Phase.OPEN
    return s


def drops(s: Session) -> dict[str, int]:
    return {r.value: n for r, n in s.counters.drops.items() if n}


def test_binary_message_passes_through_unchanged():
    s = open_session()
    assert s.on_data(OP_BINARY, FRAME, True) is FRAME
    assert drops(s) == {}


def test_text_message_is_dropped_and_counted():
    s = open_session()
    assert s.on_data(OP_TEXT, b"hello", True) is None
    assert drops(s) == {"text": 1}


def test_runt_oversized_and_bad_source_counted():
    s = open_session()
    assert s.on_data(OP_BINARY, FRAME[:13], True) is None
    assert s.on_data(OP_BINARY, FRAME + bytes(1514), True) is None
    assert s.on_data(OP_BINARY, b"\xff" * 12 + b"\x08\x00" + bytes(50), True) is None
    assert drops(s) == {"runt": 1, "oversized": 1, "bad_source": 1}


def test_fragmented_binary_message_is_reassembled():
    s = open_session()
    assert s.on_data(OP_BINARY, FRAME[:5], False) is None
    assert s.on_data(OP_CONT, FRAME[5:20], False) is None
    assert s.on_data(OP_CONT, FRAME[20:], True) == FRAME
    # The next unfragmented message is unaffected.
    assert s.on_data(OP_BINARY, FRAME, True) is FRAME
    assert drops(s) == {}


def test_fragmented_message_over_limit_is_dropped_without_growing():
    s = open_session()
    assert s.on_data(OP_BINARY, bytes(1000), False) is None
    assert s.on_data(OP_CONT, bytes(1000), False) is None
    assert s._frag is not None and len(s._frag) == 0  # nothing kept once over the limit
    assert s.on_data(OP_CONT, bytes(1000), True) is None
    assert drops(s) == {"oversized": 1}
    assert s.on_data(OP_BINARY, FRAME, True) is FRAME


def test_fragmented_text_and_fragmented_runt():
    s = open_session()
    assert s.on_data(OP_TEXT, b"ab", False) is None
    assert s.on_data(OP_CONT, b"cd", True) is None
    assert s.on_data(OP_BINARY, b"ab", False) is None
    assert s.on_data(OP_CONT, b"cd", True) is None
    assert drops(s) == {"text": 1, "runt": 1}


def test_stray_continuation_is_ignored():
    s = open_session()
    assert s.on_data(OP_CONT, FRAME, True) is None


def test_counters_add_and_describe():
    a = Counters(frames_in=1, bytes_in=60, frames_out=2, bytes_out=120)
    a.drops[Drop.TEXT] = 3
    total = Counters()
    total.add(a)
    total.add(a)
    assert total.as_dict()["bytes_out"] == 240
    assert total.as_dict()["drop_text"] == 6
    assert "dropped text=6" in total.describe()
    assert "dropped none" in Counters().describe()


def test_idle_ping_then_drop_with_fake_clock():
    s = open_session(now=1000.0)
    assert s.idle_action(1029.9) is IdleAction.NONE
    assert s.idle_action(1030.0) is IdleAction.PING
    assert s.idle_action(1031.0) is IdleAction.NONE  # one ping per interval
    assert s.idle_action(1060.0) is IdleAction.PING
    assert s.idle_action(1099.9) is IdleAction.PING
    assert s.idle_action(1100.0) is IdleAction.DROP_IDLE


def test_hearing_from_client_resets_idle():
    s = open_session(now=0.0)
    assert s.idle_action(35.0) is IdleAction.PING
    s.heard(40.0)  # the pong
    assert s.idle_action(69.0) is IdleAction.NONE
    assert s.idle_action(139.9) is IdleAction.PING
    assert s.idle_action(140.0) is IdleAction.DROP_IDLE


def test_handshake_deadline_and_attaching_phase():
    s = Session("x", POLICY, 0.0)
    assert s.idle_action(29.0) is IdleAction.NONE
    assert s.idle_action(30.0) is IdleAction.DROP_HANDSHAKE
    s.phase = Phase.ATTACHING
    assert s.idle_action(500.0) is IdleAction.NONE


@pytest.mark.parametrize("reason", ["closed by client (1000 (OK))", "idle timeout"])
def test_summary_names_everything(reason):
    s = open_session(now=10.0)
    s.network, s.tap, s.mac = "lab", "wstap3", "02:00:00:00:00:09"
    s.counters.frames_in, s.counters.bytes_in = 4, 240
    s.drop(Drop.CLIENT_SLOW, 7)
    line = s.summary(reason, 22.5)
    for part in ("198.51.100.7:4242", "12.5 s", reason, "network lab", "wstap3",
                 "02:00:00:00:00:09", "4 frames/240 B", "client_slow=7"):
        assert part in line
