"""The write-ahead rollback journal: what was done to the host, and exactly how to undo it.

`state_dir/<instance>.journal` holds JSON Lines, each fsync'd before the host is touched:

    {"op": "start", "pid": 4242, "instance": "lab", "time": 1764111111.0, "backends": {...}}
    {"seq": 1, "op": "begin", "step": {...}, "inverse": {...}}
    {"seq": 1, "op": "done"}                       (or with "inverse": {...} learnt while applying)
    {"seq": 1, "op": "undone"}                     (written by rollback, so a resumed one skips it)

`state_dir/<instance>.lock` is flock'd for as long as the owning process lives: a second wsnic with
the same instance is refused, and a journal whose lock is free was left by a dead process.
A torn last line (power cut mid-write) is ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from wsnic.config.models import DEFAULT_STATE_DIR
from wsnic.errors import JournalError
from wsnic.plan.steps import Step, step_from_json


@dataclass
class Entry:
    seq: int
    step: Step
    inverse: Step
    done: bool = False
    undone: bool = False


@dataclass(frozen=True)
class JournalInfo:
    instance: str
    path: Path
    pid: int | None  # the process that wrote it
    alive: bool  # that process still holds the lock
    entries: tuple[Entry, ...]


def journal_path(state_dir: Path, instance: str) -> Path:
    return state_dir / f"{instance}.journal"


def lock_path(state_dir: Path, instance: str) -> Path:
    return state_dir / f"{instance}.lock"


class InstanceLock:
    """An flock on `<instance>.lock`, held for the life of the process that owns the instance."""

    def __init__(self, state_dir: Path, instance: str) -> None:
        self.path = lock_path(state_dir, instance)
        self.instance = instance
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # A `wsnic status` that is looking at the lock holds it shared for a moment: try a few
        # times before concluding that another wsnic owns the instance.
        for attempt in range(5):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 4:
                    time.sleep(0.05)
        else:
            os.close(fd)
            holder = read_lock_pid(self.path)
            who = f" (pid {holder})" if holder else ""
            raise JournalError(
                f"another wsnic runs instance {self.instance!r}{who}; stop it first or pick "
                "another instance name"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking it would let one process lock the old inode while another
        # creates and locks a new one, and both would think they own the instance.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> InstanceLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_lock_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_is_held(path: Path) -> bool:
    """True when a live process holds the instance lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class Journal:
    """Append-only writer and reader of one instance's journal."""

    def __init__(self, state_dir: Path, instance: str) -> None:
        self.path = journal_path(state_dir, instance)
        self.instance = instance
        self._file: TextIO | None = None
        self._seq = 0

    # --- writing -------------------------------------------------------------------------------

    def create(self, backends: dict[str, str] | None = None) -> None:
        """Start a new journal; refuse if one is already there (a previous run's leftovers).

        `backends` names the backends that will run the steps: a firewall installed by
        iptables must be removed by iptables, whatever the profile says by then."""
        if self.exists():
            command = f"wsnic rollback --instance {self.instance}"
            if self.path.parent != DEFAULT_STATE_DIR:
                command += f" --state-dir {self.path.parent}"
            raise JournalError(
                f"{self.path} exists: a previous wsnic run of instance {self.instance!r} did not "
                f"clean up. Run `{command}` (or `wsnic apply --recover`) first."
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "x", encoding="utf-8")  # noqa: SIM115 - held open on purpose
        self._append({"op": "start", "pid": os.getpid(), "instance": self.instance,
                      "time": time.time(), "backends": backends or {}})
        _fsync_dir(self.path.parent)

    def reopen(self) -> None:
        """Append to an existing journal (rollback records its progress). A torn last line is
        cut off first, or the next record would be glued to it and both be lost."""
        self._seq = max((e.seq for e in self.entries()), default=0)
        with open(self.path, "rb+") as raw:
            data = raw.read()
            if data and not data.endswith(b"\n"):
                raw.truncate(data.rfind(b"\n") + 1)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def begin(self, step: Step, inverse: Step) -> int:
        self._seq += 1
        self._append(
            {"seq": self._seq, "op": "begin", "step": step.to_json(), "inverse": inverse.to_json()}
        )
        return self._seq

    def done(self, seq: int, inverse: Step | None = None) -> None:
        record: dict[str, Any] = {"seq": seq, "op": "done"}
        if inverse is not None:
            record["inverse"] = inverse.to_json()
        self._append(record)

    def undone(self, seq: int) -> None:
        self._append({"seq": seq, "op": "undone"})

    def _append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise JournalError(f"{self.path}: journal is not open for writing")
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _fsync_dir(self.path.parent)

    # --- reading -------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists()

    def records(self) -> list[dict[str, Any]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records: list[dict[str, Any]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                if number == len(lines):
                    break  # a torn last line: the write that was cut never happened
                raise JournalError(f"{self.path}:{number}: unreadable record: {exc}") from None
            records.append(record)
        return records

    def entries(self) -> list[Entry]:
        entries: dict[int, Entry] = {}
        for record in self.records():
            op = record.get("op")
            seq = record.get("seq")
            try:
                if op == "begin" and isinstance(seq, int):
                    entries[seq] = Entry(
                        seq, step_from_json(record["step"]), step_from_json(record["inverse"])
                    )
                elif op == "done" and seq in entries:
                    entries[seq].done = True
                    if "inverse" in record:
                        entries[seq].inverse = step_from_json(record["inverse"])
                elif op == "undone" and seq in entries:
                    entries[seq].undone = True
            except (KeyError, TypeError, ValueError) as exc:
                raise JournalError(f"{self.path}: record {seq}: {exc}") from exc
        return [entries[k] for k in sorted(entries)]

    def _start_record(self) -> dict[str, Any]:
        for record in self.records():
            if record.get("op") == "start":
                return record
        return {}

    def writer_pid(self) -> int | None:
        pid = self._start_record().get("pid")
        return pid if isinstance(pid, int) else None

    def backends(self) -> dict[str, str]:
        """The backends that applied the journaled steps (see `create`)."""
        found = self._start_record().get("backends")
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def list_journals(state_dir: Path) -> list[JournalInfo]:
    """Every journal in `state_dir` and whether its owner lives (`status`, `rollback --all`)."""
    infos: list[JournalInfo] = []
    if not state_dir.is_dir():
        return infos
    for path in sorted(state_dir.glob("*.journal")):
        instance = path.name.removesuffix(".journal")
        journal = Journal(state_dir, instance)
        infos.append(
            JournalInfo(
                instance=instance,
                path=path,
                pid=journal.writer_pid(),
                alive=lock_is_held(lock_path(state_dir, instance)),
                entries=tuple(journal.entries()),
            )
        )
    return infos


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
