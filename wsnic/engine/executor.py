"""Run a plan on the backends, journaling each step and its inverse before touching the host.

On a failure at step k, steps k..1 are undone newest first (the failed one included: inverses
tolerate "already gone") and the original error is raised. `rollback` replays a journal's inverses,
newest first, and can resume one that was itself interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from wsnic.backends.base import Backend, FirewallBackend, LinkBackend, ProcessBackend
from wsnic.engine import signals
from wsnic.engine.journal import Journal
from wsnic.errors import PlanError, RollbackError, StepError
from wsnic.plan.plan import Plan
from wsnic.plan.steps import Step

log = logging.getLogger("wsnic.executor")

Progress = Callable[[str], None]

# Test-only hook for the crash matrix: after step k is done, announce it on stderr and wait
# for a signal, so that a test can SIGKILL/SIGTERM/SIGINT the process at every step boundary.
PAUSE_ENV = "WSNIC_TEST_PAUSE_AFTER_STEP"


@dataclass(frozen=True)
class Backends:
    link: LinkBackend
    firewall: FirewallBackend
    process: ProcessBackend

    def for_step(self, step: Step) -> Backend:
        backend: Backend = getattr(self, step.backend)
        return backend

    def close(self) -> None:
        self.link.close()


def execute(plan: Plan, backends: Backends, journal: Journal, progress: Progress) -> None:
    """Apply every step of `plan`. The journal must have been created (Journal.create)."""
    check_plan_applicable(plan)
    pause_after = _pause_after()
    total = len(plan.steps)
    for index, planned in enumerate(plan.steps, start=1):
        backend = backends.for_step(planned.step)
        what = f"{planned.marker.value} {planned.step.describe()} ({backend.name})"
        label = f"[{index}/{total}] {what}"
        try:
            resolved = backend.prepare(planned.step)
            seq = journal.begin(resolved, resolved.inverse())
            learnt_inverse = backend.apply(resolved)
            journal.done(seq, learnt_inverse)
        except BaseException as exc:
            progress(f"{label} … failed")
            _undo_after_failure(journal, backends, progress)
            if isinstance(exc, Exception):
                raise StepError(f"{label} failed", exc) from exc
            raise
        progress(f"{label} … ok")
        if pause_after == index:
            print(f"wsnic: paused after step {index}", file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)


def _pause_after() -> int | None:
    value = os.environ.get(PAUSE_ENV, "")
    return int(value) if value.isdigit() else None


def _undo_after_failure(journal: Journal, backends: Backends, progress: Progress) -> None:
    try:
        rollback(journal, backends, progress)
    except RollbackError as exc:
        log.error("%s", exc)


def rollback(journal: Journal, backends: Backends, progress: Progress) -> int:
    """Undo every journaled step that is not undone yet, newest first; remove the journal.

    Stop signals are only logged from here on: an impatient second Ctrl-C must not leave the
    host half restored. Returns the number of steps undone. Raises RollbackError (journal kept)
    if some inverse failed; every other inverse is still attempted."""
    signals.hold_stop_signals()
    entries = [e for e in journal.entries() if not e.undone]
    if journal.exists():
        journal.reopen()
    failures: list[str] = []
    undone = 0
    for entry in reversed(entries):
        backend = backends.for_step(entry.inverse)
        label = f"undo {entry.inverse.describe()} ({backend.name})"
        try:
            backend.apply(entry.inverse)
        except Exception as exc:
            failures.append(f"{label}: {exc}")
            progress(f"{label} … failed: {exc}")
            continue
        undone += 1
        progress(f"{label} … ok")
        try:
            journal.undone(entry.seq)
        except OSError as exc:  # a full disk must not stop the remaining undos
            failures.append(f"recording that {label} was done: {exc}")
    if failures:
        journal.close()
        raise RollbackError(
            f"{len(failures)} step(s) could not be undone or recorded; the journal "
            f"{journal.path} is kept so that `wsnic rollback` can try again (undoing is "
            "idempotent):\n  "
            + "\n  ".join(failures)
        )
    journal.remove()
    return undone


def check_plan_applicable(plan: Plan) -> None:
    """Refuse, before anything is touched, a plan where a foreign object is in the way."""
    if plan.conflicts:
        raise PlanError(
            "refusing to apply: "
            + "; ".join(f"{p.step.describe()}: {p.reason}" for p in plan.conflicts)
        )
