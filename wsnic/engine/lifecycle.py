"""The life of `wsnic apply`: lock, journal, apply, verify, serve, then give the host back.

Every exit path ends in a rollback of the journal: a clean stop (SIGINT/SIGTERM/SIGHUP), a failed
step, a failed verification, an exception in the server. Only SIGKILL (or a power cut) skips it, and
then `wsnic rollback` replays the journal that survived.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from wsnic.config.models import Profile
from wsnic.engine.drift import step_holds
from wsnic.engine.executor import Backends, Progress, check_plan_applicable, execute, rollback
from wsnic.engine.journal import InstanceLock, Journal
from wsnic.engine.observe import observe
from wsnic.errors import PlanError
from wsnic.plan.compiler import compile_plan
from wsnic.plan.plan import Plan

log = logging.getLogger("wsnic")

# serve(profile, backends, journal) runs until a stop signal; it returns to let wsnic clean up.
Serve = Callable[[Profile, Backends, Journal], None]


class Shutdown(BaseException):
    """A stop signal arrived while wsnic was applying; unwinds into the rollback."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@dataclass
class _SignalState:
    shutting_down: bool = False


_state = _SignalState()
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    if _state.shutting_down:
        log.info("%s received while already shutting down; ignored", signal.Signals(signum).name)
        return
    _state.shutting_down = True
    raise Shutdown(signum)


def install_signal_handlers(*, shutting_down: bool = False) -> None:
    """Turn stop signals into Shutdown (or, once shutting down, into a log line)."""
    _state.shutting_down = shutting_down
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_shutdown)


def mark_shutting_down() -> None:
    _state.shutting_down = True


def apply_and_serve(
    profile: Profile,
    backends: Backends,
    progress: Progress,
    serve: Serve,
    *,
    recover: bool = False,
) -> Plan:
    """Apply the profile, run `serve` until told to stop, then roll everything back."""
    install_signal_handlers()
    with InstanceLock(profile.state_dir, profile.name):
        journal = Journal(profile.state_dir, profile.name)
        if recover and journal.exists():
            progress(f"recovering: rolling back what {journal.path} records")
            rollback(journal, backends, progress)
        plan = compile_plan(profile, observe(backends, profile.name))
        check_plan_applicable(plan)
        journal.create(backends_used(backends))
        try:
            execute(plan, backends, journal, progress)
            verify(profile, backends)
            log.info("network of instance %r is up and verified", profile.name)
            serve(profile, backends, journal)
        except Shutdown as stop:
            log.info("%s received: restoring the host", stop)
        finally:
            mark_shutting_down()
            if journal.exists():
                rollback(journal, backends, progress)
        return plan


def backends_used(backends: Backends) -> dict[str, str]:
    return {
        "link": backends.link.name,
        "firewall": backends.firewall.name,
        "process": backends.process.name,
    }


def verify(profile: Profile, backends: Backends) -> None:
    """Observe the host again: every step of the plan must now hold."""
    observed = observe(backends, profile.name)
    plan = compile_plan(profile, observed)
    missing = [
        p.step.describe() for p in plan.steps if step_holds(p.step, observed) is False
    ]
    if missing:
        raise PlanError("applied, but the host does not show: " + "; ".join(missing))
