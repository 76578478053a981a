"""Show a plan to a person (like `terraform plan`) or to a script (JSON). Pure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsnic.plan.plan import Marker, Plan
from wsnic.plan.steps import Step

# For each step: the name of the backend that runs it and the exact operations it will perform.
Explain = Callable[[Step], tuple[str, list[str]]]

_WORDS = {
    Marker.CREATE: "to create",
    Marker.CHANGE: "to change",
    Marker.IN_SYNC: "in place",
    Marker.CONFLICT: "in conflict",
}


def summary(plan: Plan) -> str:
    counts = plan.counts()
    parts = ", ".join(f"{counts[m]} {_WORDS[m]}" for m in Marker)
    if plan.conflicts:
        verdict = "apply would refuse: resolve the conflicts first."
    elif plan.pending:
        verdict = "changes pending."
    else:
        verdict = "nothing to do."
    return f"Plan: {parts}; {verdict}"


def render_text(plan: Plan, explain: Explain, backends_line: str) -> str:
    lines = [
        f"wsnic plan for instance {plan.instance!r} (objects tagged {plan.owner})",
        f"backends: {backends_line}",
        "",
        "  + create   ~ change   = already in place (ours)   ! conflict with a foreign object",
        "",
    ]
    for planned in plan.steps:
        backend, commands = explain(planned.step)
        lines.append(f"{planned.marker.value} {planned.step.describe()}  [{backend}]")
        if planned.reason:
            label = "conflict" if planned.marker is Marker.CONFLICT else "note"
            lines.append(f"    {label}: {planned.reason}")
        if planned.marker is not Marker.IN_SYNC:
            lines.extend(f"    {command}" for command in commands)
    lines += ["", summary(plan)]
    return "\n".join(lines) + "\n"


def render_json(plan: Plan, explain: Explain, backends: dict[str, str]) -> dict[str, Any]:
    steps = []
    for planned in plan.steps:
        backend, commands = explain(planned.step)
        steps.append(
            {
                "marker": planned.marker.value,
                "action": planned.marker.name.lower(),
                "key": planned.step.key(),
                "description": planned.step.describe(),
                "backend": backend,
                "commands": commands,
                "reason": planned.reason or None,
                "step": planned.step.to_json(),
                "inverse": _inverse_json(planned.step),
            }
        )
    counts = plan.counts()
    return {
        "instance": plan.instance,
        "owner": plan.owner,
        "backends": backends,
        "steps": steps,
        "summary": {_WORDS[m].replace(" ", "_"): counts[m] for m in Marker},
        "changes_pending": bool(plan.pending),
        "conflicts": len(plan.conflicts),
    }


def _inverse_json(step: Step) -> dict[str, Any] | None:
    try:
        return step.inverse().to_json()
    except ValueError:
        return None  # recorded at apply time (a sysctl's previous value)
