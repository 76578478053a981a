"""What `wsnic apply` does once the network is up: run the relay and supervise the children."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from wsnic.config.models import Profile
from wsnic.engine import signals
from wsnic.engine.executor import Backends
from wsnic.engine.journal import Journal
from wsnic.errors import BackendError
from wsnic.plan.steps import StartProcess

log = logging.getLogger("wsnic")

MAX_RESTARTS = 5  # per child, over the life of the instance
SUPERVISE_EVERY = 1.0  # seconds


def serve(profile: Profile, backends: Backends, journal: Journal) -> None:
    """Serve WebSocket clients until SIGINT/SIGTERM/SIGHUP, then return for the rollback."""
    try:
        asyncio.run(_serve(profile, backends, journal))
    finally:
        signals.hold_stop_signals()  # what follows is the rollback


def relay_workers(profile: Profile) -> int:
    """How many relay processes: as configured, or one per CPU core."""
    return profile.server.workers or os.cpu_count() or 1


async def _serve(profile: Profile, backends: Backends, journal: Journal) -> None:
    # The data plane is imported here: plan, status and rollback never need it.
    from wsnic.relay.pool import WorkerPool
    from wsnic.relay.server import RelayServer
    from wsnic.relay.settings import RelaySettings

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Not loop.add_signal_handler: closing the loop would reset the signals to their defaults,
    # and a SIGTERM in that moment would kill wsnic before it gave the host back.
    def on_stop(signum: int) -> None:
        loop.call_soon_threadsafe(_stop_on, signum, stop)

    signals.call_on_stop(on_stop)
    workers = relay_workers(profile)
    settings = RelaySettings.from_profile(profile)
    relay: WorkerPool | RelayServer
    if workers > 1:
        relay = WorkerPool(settings, backends.link.attach_port, backends.link.release_ports,
                           workers)
        failed = relay.failed
    else:
        relay = RelayServer(settings, backends.link.attach_port,
                            release_ports=backends.link.release_ports)
        failed = asyncio.Event()
    try:
        await relay.start()
        log.info("serving instance %r; stop with Ctrl-C or SIGTERM to restore the host",
                 profile.name)
        waiters = [
            asyncio.create_task(_supervise(backends, journal, stop)),
            asyncio.create_task(stop.wait()),
            asyncio.create_task(failed.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if failed.is_set():
            raise BackendError("every relay worker has died; stopping")
    finally:
        await relay.stop()


def _stop_on(signum: int, stop: asyncio.Event) -> None:
    log.info("%s received: stopping", signal.Signals(signum).name)
    stop.set()


async def _supervise(backends: Backends, journal: Journal, stop: asyncio.Event) -> None:
    """Restart a child (dnsmasq, iperf) that died, a bounded number of times."""
    restarts: dict[str, int] = {}
    while not stop.is_set():
        await asyncio.sleep(SUPERVISE_EVERY)
        for name, returncode in backends.process.poll_exited():
            count = restarts.get(name, 0)
            if count >= MAX_RESTARTS:
                log.error("%s exited (code %s); restarted %d times already, giving up",
                          name, returncode, count)
                continue
            restarts[name] = count + 1
            log.warning("%s exited unexpectedly (code %s); restarting (%d/%d)",
                        name, returncode, count + 1, MAX_RESTARTS)
            restart_child(name, backends, journal)


def restart_child(name: str, backends: Backends, journal: Journal) -> None:
    for entry in reversed(journal.entries()):
        if isinstance(entry.step, StartProcess) and entry.step.name == name and not entry.undone:
            try:
                inverse = backends.process.apply(entry.step)
            except Exception as exc:
                log.error("restarting %s failed: %s", name, exc)
                return
            journal.done(entry.seq, inverse)
            return
    log.error("%s is not in the journal; not restarted", name)
