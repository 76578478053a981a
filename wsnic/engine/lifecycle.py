"""The life of `wsnic apply`: lock, journal, apply, verify, serve, then give the host back.

Every exit path ends in a rollback of the journal: a clean stop (SIGINT/SIGTERM/SIGHUP), a failed
step, a failed verification, an exception in the server. Only SIGKILL (or a power cut) skips it, and
then `wsnic rollback` replays the journal that survived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from wsnic.config.models import Profile
from wsnic.engine import signals
from wsnic.engine.drift import step_holds
from wsnic.engine.executor import Backends, Progress, check_plan_applicable, execute, rollback
from wsnic.engine.journal import InstanceLock, Journal
from wsnic.engine.observe import observe
from wsnic.engine.recovery import backends_for_journal
from wsnic.errors import PlanError
from wsnic.plan.compiler import compile_plan

log = logging.getLogger("wsnic")

# serve(profile, backends, journal) runs until a stop signal; it returns to let wsnic clean up.
Serve = Callable[[Profile, Backends, Journal], None]


def apply_and_serve(
    profile: Profile,
    backends: Backends,
    progress: Progress,
    serve: Serve,
    *,
    recover: bool = False,
) -> bool:
    """Apply the profile, run `serve` until told to stop, then roll everything back.

    Returns False when a stop signal ended it before it was serving."""
    signals.raise_on_stop()
    with InstanceLock(profile.state_dir, profile.name):
        journal = Journal(profile.state_dir, profile.name)
        created = False
        try:
            if recover and journal.exists():
                progress(f"recovering: rolling back what {journal.path} records")
                with backends_for_journal(journal) as recorded:
                    rollback(journal, recorded, progress)
                signals.raise_on_stop()
            plan = compile_plan(profile, observe(backends, profile.name))
            check_plan_applicable(plan)
            journal.create(backends_used(backends))
            created = True
            execute(plan, backends, journal, progress)
            verify(profile, backends)
            log.info("network of instance %r is up and verified", profile.name)
            serve(profile, backends, journal)
        except signals.Shutdown as stop:
            log.info("%s received: %s", stop, "restoring the host" if created else "stopping")
            return False
        finally:
            signals.hold_stop_signals()
            if created and journal.exists():
                rollback(journal, backends, progress)
        return True


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
