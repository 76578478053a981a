"""A real guest's network card: a TAP in the guest namespace, copied to and from a WebSocket.

The process runs in the server's namespace (so it reaches the server on 127.0.0.1) and creates
its TAP from a thread that entered the guest namespace; the fd works from any thread after that.

    ip netns exec SERVER_NS python -m tests.helpers.connector --guest-ns G --tap eth0 \\
        --url ws://127.0.0.1:8086/ [--insecure]

Prints "READY <tap> <mac>" when the WebSocket is open and the TAP exists; runs until SIGTERM or
until the server closes the connection. In-process: `await run_connector(...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import ssl
import sys
from collections.abc import Callable

from websockets.asyncio.client import ClientConnection, connect

from wsnic.backends._netns import call_in_netns
from wsnic.relay.tap import open_tap

QUEUE_FRAMES = 4096  # frames waiting for the WebSocket; more are dropped like a full NIC


def client_ssl(url: str, insecure: bool) -> ssl.SSLContext | None:
    if not url.startswith("wss://"):
        return None
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def _pump(ws: ClientConnection, fd: int, stop: asyncio.Event) -> str:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_FRAMES)

    def on_readable() -> None:
        try:
            for _ in range(128):
                frame = os.read(fd, 65536)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(frame)
        except BlockingIOError:
            pass

    async def to_server() -> None:
        while True:
            await ws.send(await queue.get())

    async def from_server() -> None:
        async for message in ws:
            if isinstance(message, bytes):
                with contextlib.suppress(OSError):  # a full or down TAP drops, like a NIC
                    os.write(fd, message)

    loop.add_reader(fd, on_readable)
    tasks = {
        asyncio.create_task(to_server(), name="to_server"),
        asyncio.create_task(from_server(), name="from_server"),
        asyncio.create_task(stop.wait(), name="stop"),
    }
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(fd)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    first = done.pop()
    return "stopped" if first.get_name() == "stop" else f"{first.get_name()} ended"


async def run_connector(
    guest_ns: str | None,
    tap: str,
    url: str,
    *,
    insecure: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str, str], None] | None = None,
) -> str:
    """Relay between a new TAP `tap` in `guest_ns` and `url` until `stop` is set or the
    connection ends; return why it ended. The TAP disappears when this returns."""
    stop = stop or asyncio.Event()
    async with connect(
        url,
        ssl=client_ssl(url, insecure),
        compression=None,  # v86 sends plain frames
        max_size=None,
        ping_interval=None,
        open_timeout=10,
        close_timeout=2,
    ) as ws:
        fd, name, mac = call_in_netns(guest_ns, lambda: open_tap(tap))
        try:
            if on_ready is not None:
                on_ready(name, mac)
            return await _pump(ws, fd, stop)
        finally:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="connector")
    parser.add_argument("--guest-ns", required=True)
    parser.add_argument("--tap", default="eth0")
    parser.add_argument("--url", required=True)
    parser.add_argument("--insecure", action="store_true", help="accept any TLS certificate")
    args = parser.parse_args(argv)

    async def go() -> str:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_connector(
            args.guest_ns, args.tap, args.url, insecure=args.insecure, stop=stop,
            on_ready=lambda name, mac: print(f"READY {name} {mac}", flush=True),
        )

    why = asyncio.run(go())
    print(f"connector ended: {why}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
