"""Stop signals (SIGINT, SIGTERM, SIGHUP) in the main process, in three modes:

- raise (while wsnic prepares and applies): the signal raises `Shutdown` in the main thread, which
  unwinds into the rollback;
- call (while it serves): the signal calls a function, which asks the event loop to stop;
- hold (once the rollback has begun): the signal is only logged. Giving the host back must not
  be cut short by a second Ctrl-C.

Python runs signal handlers in the main thread whichever thread the kernel picked, so one
handler and one mode decide for the whole process.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("wsnic")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Shutdown(BaseException):
    """A stop signal arrived while wsnic was preparing or applying."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@dataclass
class _Mode:
    holding: bool = False
    callback: Callable[[int], None] | None = None


_mode = _Mode()


def _handle(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _mode.callback is not None:
        try:
            _mode.callback(signum)
        except RuntimeError:  # the event loop is already closed: we are on the way out
            log.info("%s received while stopping; ignored", name)
        return
    if _mode.holding:
        log.info("%s received while restoring the host; ignored until it is done", name)
        return
    _mode.holding = True
    raise Shutdown(signum)


def _install() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handle)


def raise_on_stop() -> None:
    _mode.holding, _mode.callback = False, None
    _install()


def call_on_stop(callback: Callable[[int], None]) -> None:
    _mode.holding, _mode.callback = False, callback
    _install()


def hold_stop_signals(*, install: bool = False) -> None:
    """From now on stop signals are only logged (where our handler is installed, or with
    `install`: `wsnic rollback` installs it; the executor only switches the mode)."""
    _mode.holding, _mode.callback = True, None
    if install:
        _install()
