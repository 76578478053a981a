"""A plan: the ordered steps that take the host from what was observed to the profile."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from wsnic.plan.steps import Step


class Marker(enum.Enum):
    CREATE = "+"  # will be created
    CHANGE = "~"  # exists with another value (a sysctl) and will be changed
    IN_SYNC = "="  # already in place and ours
    CONFLICT = "!"  # an object wsnic does not own stands in the way

    @property
    def pending(self) -> bool:
        return self in (Marker.CREATE, Marker.CHANGE)


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    marker: Marker
    reason: str = ""  # why it conflicts, or what it changes from


@dataclass(frozen=True)
class Plan:
    instance: str
    owner: str
    steps: tuple[PlannedStep, ...]

    @property
    def conflicts(self) -> tuple[PlannedStep, ...]:
        return tuple(p for p in self.steps if p.marker is Marker.CONFLICT)

    @property
    def pending(self) -> tuple[PlannedStep, ...]:
        return tuple(p for p in self.steps if p.marker.pending)

    def counts(self) -> dict[Marker, int]:
        counts = dict.fromkeys(Marker, 0)
        for planned in self.steps:
            counts[planned.marker] += 1
        return counts
