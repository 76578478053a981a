"""The journal survives torn writes, refuses leftovers and locks its instance."""

from __future__ import annotations

import pytest

from wsnic.engine.journal import InstanceLock, Journal, list_journals, lock_is_held
from wsnic.errors import JournalError
from wsnic.plan.steps import CreateBridge, SetSysctl, StartProcess, StopProcess

BRIDGE = CreateBridge("wsbr0", "02:00:00:00:00:01", "wsnic:t")


def test_begin_done_undone_round_trip(tmp_path) -> None:
    journal = Journal(tmp_path, "t")
    journal.create({"link": "netlink", "firewall": "nftables", "process": "process"})
    seq = journal.begin(BRIDGE, BRIDGE.inverse())
    journal.done(seq)
    start = StartProcess("dnsmasq:wsbr0", ("dnsmasq",), "wsnic:t")
    seq2 = journal.begin(start, start.inverse())
    learnt = StopProcess("dnsmasq:wsbr0", ("dnsmasq",), "wsnic:t", pid=42, start_time=7)
    journal.done(seq2, learnt)
    journal.undone(seq2)
    entries = Journal(tmp_path, "t").entries()
    assert [(e.seq, e.done, e.undone) for e in entries] == [(1, True, False), (2, True, True)]
    assert entries[0].inverse == BRIDGE.inverse()
    assert entries[1].inverse == learnt
    assert Journal(tmp_path, "t").backends()["firewall"] == "nftables"


def test_torn_last_line_is_ignored(tmp_path) -> None:
    journal = Journal(tmp_path, "t")
    journal.create()
    journal.begin(BRIDGE, BRIDGE.inverse())
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"seq": 2, "op": "beg')  # the write a power cut interrupted
    entries = Journal(tmp_path, "t").entries()
    assert len(entries) == 1 and not entries[0].done


def test_corrupt_middle_line_is_an_error_naming_the_line(tmp_path) -> None:
    journal = Journal(tmp_path, "t")
    journal.create()
    journal.close()
    with open(journal.path, "a") as f:
        f.write("garbage\n")
        f.write('{"seq": 1, "op": "done"}\n')
    with pytest.raises(JournalError, match=r"t\.journal:2: unreadable record"):
        Journal(tmp_path, "t").entries()


def test_leftover_journal_refuses_a_new_run(tmp_path) -> None:
    Journal(tmp_path, "t").create()
    with pytest.raises(JournalError, match="wsnic rollback"):
        Journal(tmp_path, "t").create()


def test_instance_lock_is_exclusive_and_released(tmp_path) -> None:
    with InstanceLock(tmp_path, "t"):
        assert lock_is_held(tmp_path / "t.lock")
        with pytest.raises(JournalError, match="another wsnic runs instance 't'"):
            InstanceLock(tmp_path, "t").acquire()
    assert not lock_is_held(tmp_path / "t.lock")
    InstanceLock(tmp_path, "t").acquire()  # free again


def test_list_journals_reports_dead_owner(tmp_path) -> None:
    journal = Journal(tmp_path, "t")
    journal.create()
    journal.begin(SetSysctl("net.ipv4.ip_forward", "1", "0"),
                  SetSysctl("net.ipv4.ip_forward", "0", "1"))
    journal.close()
    [info] = list_journals(tmp_path)
    assert info.instance == "t" and not info.alive and len(info.entries) == 1


def test_rollback_progress_after_a_torn_line_stays_readable(tmp_path) -> None:
    journal = Journal(tmp_path, "t")
    journal.create()
    for _ in range(2):
        seq = journal.begin(BRIDGE, BRIDGE.inverse())
        journal.done(seq)
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"seq": 3, "op": "beg')  # cut short by a crash
    resumed = Journal(tmp_path, "t")
    resumed.reopen()
    resumed.undone(2)
    resumed.undone(1)
    resumed.close()
    entries = Journal(tmp_path, "t").entries()  # must not raise: the torn bytes are gone
    assert [(e.seq, e.undone) for e in entries] == [(1, True), (2, True)]


def test_leftover_journal_message_names_the_exact_rollback_command(tmp_path) -> None:
    Journal(tmp_path, "lab").create()
    with pytest.raises(JournalError) as info:
        Journal(tmp_path, "lab").create()
    assert f"wsnic rollback --instance lab --state-dir {tmp_path}" in str(info.value)
