"""Log format and levels, the same in the main process and in relay workers."""

from __future__ import annotations

import logging

# Libraries whose own debug output (every netlink message) would drown wsnic's.
_NOISY = ("pyroute2", "asyncio", "websockets")


def _quiet_libraries(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not record.name.startswith(_NOISY)


def setup_logging(level: int, tag: str = "") -> None:
    """Timestamped lines on stderr; `tag` marks a relay worker's lines (e.g. "[w1]")."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        datefmt="%H:%M:%S",
    )
    # A filter, not setLevel: pyroute2 resets its loggers' levels when it is imported.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_quiet_libraries)
