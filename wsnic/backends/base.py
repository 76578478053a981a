"""One Protocol per backend kind. The executor only ever talks to these.

Every backend takes an optional network namespace name at construction, so tests run the
production code inside a throwaway namespace. Every method that changes the host is idempotent:
applying an Ensure-style step that already holds, or removing what is already gone, succeeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from wsnic.plan.observed import LinkState, ProcessState, RouteState
from wsnic.plan.steps import Step


class Backend(Protocol):
    name: str  # e.g. "iproute2", shown by `wsnic plan`

    def commands(self, step: Step) -> list[str]:
        """What applying `step` will do, as exact commands or operations (pure, for `plan`)."""
        ...

    def prepare(self, step: Step) -> Step:
        """Return `step` with any prior value it must remember filled in (read-only)."""
        ...

    def apply(self, step: Step) -> Step | None:
        """Make `step` hold on the host. Return the exact inverse if applying it learnt
        something the inverse needs (a child's pid); None when `step.inverse()` is exact."""
        ...


class LinkBackend(Backend, Protocol):
    """Links, addresses, link state and sysctls (CreateBridge … SetSysctl)."""

    def links(self) -> list[LinkState]: ...

    def routes(self) -> list[RouteState]: ...

    def sysctl(self, name: str) -> str | None: ...

    def attach_port(self, port: str, bridge: str) -> None:
        """Enslave `port` (a client's TAP) to `bridge` and bring it up."""
        ...

    def release_ports(self, ports: Sequence[str]) -> None:
        """Delete departing clients' TAPs in one batch (absent ones are fine)."""
        ...

    def sweep(self, owner: str) -> list[str]:
        """Remove every link tagged `owner`; return what was removed."""
        ...

    def close(self) -> None:
        """Release sockets and threads (idempotent)."""
        ...


class FirewallBackend(Backend, Protocol):
    """InstallFirewall / RemoveFirewall, each one atomic transaction."""

    def installed(self, instance: str) -> bool: ...

    def sweep(self, instance: str) -> list[str]: ...


class ProcessBackend(Backend, Protocol):
    """StartProcess / StopProcess for supervised children."""

    def running(self, owner: str) -> list[ProcessState]: ...

    def alive(self, pid: int, start_time: int | None) -> bool: ...

    def sweep(self, owner: str) -> list[str]: ...

    def poll_exited(self) -> list[tuple[str, int]]:
        """Children started by this backend that have exited since: (name, exit code)."""
        ...
