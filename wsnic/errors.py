"""Every error wsnic raises on purpose.

    WsnicError                 base; the CLI turns it into exit code 1 and one clear message
    ├── ConfigError            a profile, wsnic.conf or flag is invalid (names file, line, field)
    ├── PlanError              the plan cannot be applied as it stands (conflicts, missing uplink)
    ├── BackendError           a backend operation failed on the host (names the command)
    ├── StepError              a step failed while the executor applied it (wraps the cause)
    ├── JournalError           the journal is locked, left over, or unreadable
    └── RollbackError          undoing some steps failed; the rest was still undone
"""

from __future__ import annotations


class WsnicError(Exception):
    """Base of all expected errors."""


class ConfigError(WsnicError):
    """Invalid configuration. `problems` lists one line per invalid field."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = problems or []
        text = message if not self.problems else message + "\n" + "\n".join(
            f"  {p}" for p in self.problems
        )
        super().__init__(text)


class PlanError(WsnicError):
    """The plan has conflicts or cannot be built against this host."""


class BackendError(WsnicError):
    """A host operation failed."""


class StepError(WsnicError):
    """A step failed during apply; the executor has undone what came before it."""

    def __init__(self, step_description: str, cause: BaseException) -> None:
        self.step_description = step_description
        self.cause = cause
        super().__init__(f"{step_description}: {cause}")


class JournalError(WsnicError):
    """The journal cannot be used (locked by a live process, left by a dead one, unreadable)."""


class RollbackError(WsnicError):
    """Some inverse steps failed while rolling back."""
