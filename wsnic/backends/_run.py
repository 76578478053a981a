"""The only place wsnic runs a command: argv lists, never a shell, errors with context."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

from wsnic.errors import BackendError

log = logging.getLogger("wsnic.run")


def in_netns(argv: Sequence[str], netns: str | None) -> list[str]:
    """`argv` as it must run to act inside `netns` (None: the current namespace)."""
    if netns is None:
        return list(argv)
    return ["ip", "netns", "exec", netns, *argv]


def render(argv: Sequence[str]) -> str:
    """A copy-pasteable rendering of argv, for logs and `wsnic plan`."""
    return shlex.join(argv)


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    input_text: str | None = None,
    check: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run argv (inside `netns` if given); raise BackendError naming the command on failure."""
    full = in_netns(argv, netns)
    log.debug("$ %s", render(full))
    try:
        result = subprocess.run(
            full,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise BackendError(
            f"{full[0]}: command not found (Debian: apt-get install the package that provides it)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"{render(full)}: no answer within {timeout:g} s") from exc
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise BackendError(f"{render(full)} failed with exit code {result.returncode}: {detail}")
    return result
