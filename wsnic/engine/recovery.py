"""`wsnic rollback` and `wsnic status`: act on journals that outlived their process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from wsnic.backends.select import FirewallChoice, LinkChoice, select_backends
from wsnic.engine.drift import step_holds
from wsnic.engine.executor import Backends, Progress, rollback
from wsnic.engine.journal import InstanceLock, Journal, list_journals
from wsnic.engine.observe import observe
from wsnic.plan.steps import StartProcess
from wsnic.tags import owner_tag

DEFAULT_INSTANCE = "wsnic"


def backends_for_journal(
    journal: Journal, link_choice: str | None, firewall_choice: str | None
) -> Backends:
    """The backends that applied the journal, unless the user says otherwise: a ruleset put
    in place by iptables is only removed by iptables."""
    recorded = journal.backends()
    link = link_choice or recorded.get("link", "auto")
    firewall = firewall_choice or recorded.get("firewall", "auto")
    return select_backends(cast(LinkChoice, link), cast(FirewallChoice, firewall))


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
    if all_instances:
        names = [info.instance for info in list_journals(state_dir)]
        if not names:
            progress(f"no journal in {state_dir}; nothing to roll back")
    else:
        names = [instance or DEFAULT_INSTANCE]
    for name in names:
        _rollback_one(state_dir, name, sweep, link_choice, firewall_choice, progress)


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
        backends = backends_for_journal(journal, link_choice, firewall_choice)
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
        backends = backends_for_journal(journal, link_choice, firewall_choice)
        observed = observe(backends, info.instance)
        steps = []
        for entry in info.entries:
            if entry.undone:
                state = "undone"
            elif isinstance(entry.step, StartProcess) and entry.inverse is not None:
                pid = getattr(entry.inverse, "pid", None)
                start = getattr(entry.inverse, "start_time", None)
                state = "ok" if pid and backends.process.alive(pid, start) else "DRIFT"
            else:
                holds = step_holds(entry.step, observed)
                state = "ok" if holds is not False else "DRIFT"
                if not entry.done:
                    state = "partial"
            steps.append({"seq": entry.seq, "description": entry.step.describe(),
                          "done": entry.done, "state": state})
        instances.append({
            "instance": info.instance,
            "journal": str(info.path),
            "pid": info.pid,
            "alive": info.alive,
            "backends": journal.backends(),
            "steps": steps,
        })
    return {"state_dir": str(state_dir), "instances": instances}
