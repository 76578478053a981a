"""`wsnic rollback` and `wsnic status`: act on journals that outlived their process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from wsnic.backends.select import FirewallChoice, LinkChoice, select_backends
from wsnic.engine.drift import step_holds
from wsnic.engine.executor import Backends, Progress, rollback
from wsnic.engine.journal import InstanceLock, Journal, JournalInfo, list_journals
from wsnic.engine.observe import observe
from wsnic.errors import RollbackError, WsnicError
from wsnic.plan.steps import StopProcess
from wsnic.tags import owner_tag

DEFAULT_INSTANCE = "wsnic"


@contextlib.contextmanager
def backends_for_journal(
    journal: Journal, link_choice: str | None = None, firewall_choice: str | None = None
) -> Iterator[Backends]:
    """The backends that applied the journal, unless the user says otherwise: a ruleset put
    in place by iptables is only removed by iptables."""
    recorded = journal.backends()
    link = link_choice or recorded.get("link", "auto")
    firewall = firewall_choice or recorded.get("firewall", "auto")
    backends = select_backends(cast(LinkChoice, link), cast(FirewallChoice, firewall))
    try:
        yield backends
    finally:
        backends.close()


def rollback_instances(
    state_dir: Path,
    *,
    instance: str | None,
    all_instances: bool,
    sweep: bool,
    link_choice: str | None,
    firewall_choice: str | None,
    progress: Progress,
) -> None:
    """Roll back one instance, or (--all) every instance whose owner is dead; an instance
    that is still running is left alone. Raises after trying them all if any failed."""
    if all_instances:
        infos = list_journals(state_dir)
        if not infos:
            progress(f"no journal in {state_dir}; nothing to roll back")
        for info in infos:
            if info.alive:
                progress(f"instance {info.instance}: still running (pid {info.pid}); skipped")
        names = [info.instance for info in infos if not info.alive]
    else:
        names = [instance or DEFAULT_INSTANCE]
    failures: list[str] = []
    for name in names:
        try:
            _rollback_one(state_dir, name, sweep, link_choice, firewall_choice, progress)
        except WsnicError as exc:
            if not all_instances:
                raise
            failures.append(f"instance {name}: {exc}")
    if failures:
        raise RollbackError("\n".join(failures))


def _rollback_one(
    state_dir: Path,
    instance: str,
    sweep: bool,
    link_choice: str | None,
    firewall_choice: str | None,
    progress: Progress,
) -> None:
    # Holding the instance lock proves its owner is dead, and keeps a new apply out meanwhile.
    with InstanceLock(state_dir, instance):
        journal = Journal(state_dir, instance)
        with backends_for_journal(journal, link_choice, firewall_choice) as backends:
            if journal.exists():
                count = rollback(journal, backends, progress)
                progress(f"instance {instance}: {count} step(s) undone; journal removed")
            else:
                progress(f"instance {instance}: no journal in {state_dir}; nothing to roll back")
            if sweep:
                owner = owner_tag(instance)
                removed = [
                    *backends.process.sweep(owner),
                    *backends.firewall.sweep(instance),
                    *backends.link.sweep(owner),
                ]
                for what in removed:
                    progress(f"swept {what}")
                progress(f"instance {instance}: sweep removed {len(removed)} tagged object(s)")


def instance_status(
    state_dir: Path, link_choice: str | None, firewall_choice: str | None
) -> dict[str, Any]:
    instances = []
    for info in list_journals(state_dir):
        journal = Journal(state_dir, info.instance)
        with backends_for_journal(journal, link_choice, firewall_choice) as backends:
            instances.append(_status_of(info, journal, backends))
    return {"state_dir": str(state_dir), "instances": instances}


def _status_of(info: JournalInfo, journal: Journal, backends: Backends) -> dict[str, Any]:
    observed = observe(backends, info.instance)
    steps = []
    for entry in info.entries:
        if entry.undone:
            state = "undone"
        elif not entry.done:
            state = "partial"
        elif isinstance(entry.inverse, StopProcess):
            alive = entry.inverse.pid is not None and backends.process.alive(
                entry.inverse.pid, entry.inverse.start_time
            )
            state = "ok" if alive else "DRIFT"
        else:
            state = "DRIFT" if step_holds(entry.step, observed) is False else "ok"
        steps.append({"seq": entry.seq, "description": entry.step.describe(),
                      "done": entry.done, "state": state})
    return {
        "instance": info.instance,
        "journal": str(info.path),
        "pid": info.pid,
        "alive": info.alive,
        "backends": journal.backends(),
        "steps": steps,
    }
