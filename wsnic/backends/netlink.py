"""Link backend on rtnetlink (pyroute2), with sysctls read and written under /proc/sys.

pyroute2 0.9's synchronous IPRoute cannot be used from a thread that runs an asyncio loop (it
calls run_until_complete on it), it keeps one socket per calling thread (created in that thread's
namespace), and IPRoute(netns=…) forks a helper and creates a missing namespace. So every
operation runs on one worker thread per backend: the thread enters `netns` with setns(2) (the
way wsnic.backends._netns does), opens one IPRoute without multicast groups (idle
notifications would only fill its buffer) and serves calls from a queue until close().
"""

from __future__ import annotations

import errno
import ipaddress
import os
import queue
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from wsnic.backends import _sysctl
from wsnic.backends._netns import enter_netns
from wsnic.backends.iproute2 import (
    MAIN_TABLE,
    link_of,
    needs_change,
    parse_interface,
    prepare_link_step,
    retiring_group,
    route_destination,
    unsupported,
)
from wsnic.errors import BackendError
from wsnic.plan.observed import LinkState, RouteState
from wsnic.plan.steps import (
    AddAddress,
    CreateBridge,
    DeleteAddress,
    DeleteBridge,
    SetLinkDown,
    SetLinkUp,
    SetSysctl,
    Step,
)

T = TypeVar("T")
IFF_UP = 0x1
AF_INET = 2
# Errors that mean "the device is gone" in a request naming a link.
_GONE = (errno.ENODEV,)


def netlink_available() -> bool:
    """pyroute2 imports and an rtnetlink socket opens in this process."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        return False
    try:
        with IPRoute(groups=0) as ipr:
            ipr.link("get", index=1)
    except Exception:  # any failure means "not usable here"; the caller falls back to iproute2
        return False
    return True


class _Worker:
    """A thread living in one network namespace that owns one IPRoute and runs calls on it."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[Any], T]) -> T:
        """fn(ipr) evaluated on the worker thread (inside the namespace)."""
        with self._lock:
            if self._thread is None:
                self._start()
        done: Future[T] = Future()
        self._jobs.put((fn, done))
        return done.result()

    def _start(self) -> None:
        ready: Future[None] = Future()
        thread = threading.Thread(
            target=self._serve, args=(ready,), name=f"wsnic-netlink-{self.netns or 'host'}",
            daemon=True,
        )
        thread.start()
        try:
            ready.result()
        except BaseException:
            thread.join()
            raise
        self._thread = thread

    def _serve(self, ready: Future[None]) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            from pyroute2 import IPRoute

            ipr = IPRoute(groups=0)
        except BaseException as exc:
            ready.set_exception(_as_backend_error(exc, f"open rtnetlink{self.where()}"))
            return
        ready.set_result(None)
        try:
            while (job := self._jobs.get()) is not None:
                fn, done = job
                try:
                    done.set_result(fn(ipr))
                except BaseException as exc:  # handed to the calling thread
                    done.set_exception(exc)
        finally:
            ipr.close()

    def where(self) -> str:
        return f" in netns {self.netns}" if self.netns is not None else ""

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
                thread.join()


class NetlinkLinkBackend:
    """LinkBackend speaking rtnetlink through pyroute2 (inside `netns` when given)."""

    name = "netlink"

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._worker = _Worker(netns)
        # Stop the worker (and close its socket) when the backend is dropped or at exit.
        self._finalizer = weakref.finalize(self, self._worker.close)
        self._bridge_index: dict[str, int] = {}

    def close(self) -> None:
        """Stop the worker thread and close its socket (a later call starts a new one)."""
        self._worker.close()

    def __enter__(self) -> NetlinkLinkBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- rendering -------------------------------------------------------------------------

    def _ops(self, step: Step) -> list[str]:
        match step:
            case CreateBridge(name=name, mac=mac, owner=owner):
                return [
                    f"RTM_NEWLINK {name} kind=bridge address={mac.lower()} (create)",
                    f"RTM_NEWLINK {name} ifalias={owner}",
                ]
            case DeleteBridge(name=name):
                return [f"RTM_DELLINK {name}"]
            case AddAddress(link=link, address=address):
                brd = _broadcast(parse_interface(link, address))
                extra = f" broadcast={brd}" if brd else ""
                return [f"RTM_NEWADDR {link} {parse_interface(link, address)}{extra}"]
            case DeleteAddress(link=link, address=address):
                return [f"RTM_DELADDR {link} {parse_interface(link, address)}"]
            case SetLinkUp(link=link):
                return [f"RTM_NEWLINK {link} flags=+UP"]
            case SetLinkDown(link=link):
                return [f"RTM_NEWLINK {link} flags=-UP"]
            case SetSysctl(name=name, value=value):
                _sysctl.check_value(name, value)
                return [f"write {_sysctl.proc_path(name)} = {value}"]
        raise unsupported(self.name, step)

    def commands(self, step: Step) -> list[str]:
        prefix = f"netns {self.netns}: " if self.netns is not None else ""
        return [prefix + op for op in self._ops(step)]

    # --- worker plumbing -------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        try:
            return self._worker.call(fn)
        except BackendError:
            raise
        except Exception as exc:
            raise _as_backend_error(exc, what + self._worker.where()) from exc

    def _get(self, name: str) -> LinkState | None:
        def read(ipr: Any) -> LinkState | None:
            msg = _get_link(ipr, name)
            if msg is None:
                return None
            index = msg["index"]
            addrs = [a for a in ipr.get_addr() if a["index"] == index]
            master = msg.get_attr("IFLA_MASTER")
            names = {} if not master else {master: _ifname_of(ipr, master)}
            return _link_state(msg, addrs, names)

        return self._call(f"RTM_GETLINK {name}", read)

    # --- observing -------------------------------------------------------------------------

    def links(self) -> list[LinkState]:
        def read(ipr: Any) -> list[LinkState]:
            links = list(ipr.get_links())
            addrs = list(ipr.get_addr())
            names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in links}
            return [
                _link_state(m, [a for a in addrs if a["index"] == m["index"]], names)
                for m in links
            ]

        return self._call("RTM_GETLINK dump", read)

    def routes(self) -> list[RouteState]:
        def read(ipr: Any) -> list[RouteState]:
            names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}
            result = []
            for msg in ipr.get_routes(family=AF_INET):
                table = msg.get_attr("RTA_TABLE") or msg["table"]
                if table != MAIN_TABLE:
                    continue
                oif = msg.get_attr("RTA_OIF")
                result.append(
                    RouteState(
                        destination=route_destination(msg.get_attr("RTA_DST"), msg["dst_len"]),
                        device=names.get(oif) if oif is not None else None,
                    )
                )
            return result

        return self._call("RTM_GETROUTE dump", read)

    def sysctl(self, name: str) -> str | None:
        path = _sysctl.proc_path(name)

        def read(_ipr: Any) -> str | None:
            try:
                with open(path, encoding="ascii") as fh:
                    return _sysctl.clean(fh.read())
            except FileNotFoundError:
                return None

        return self._call(f"read {path}", read)

    # --- changing --------------------------------------------------------------------------

    def prepare(self, step: Step) -> Step:
        return prepare_link_step(self.name, step, self.sysctl)

    def apply(self, step: Step) -> Step | None:
        what = "; ".join(self._ops(step))  # validates the step before anything is read
        name = link_of(step)
        if not needs_change(step, self._get(name) if name is not None else None):
            return None
        match step:
            case CreateBridge():
                self._create_bridge(step, what)
            case DeleteBridge():
                self._call(what, _deleter(step.name))
            case AddAddress(link=link, address=address):
                iface = parse_interface(link, address)
                self._call(what, lambda ipr: _add_address(ipr, link, iface))
            case DeleteAddress(link=link, address=address):
                iface = parse_interface(link, address)
                self._call(what, lambda ipr: _del_address(ipr, link, iface))
            case SetLinkUp(link=link):
                self._call(what, lambda ipr: ipr.link("set", ifname=link, state="up"))
            case SetLinkDown(link=link):
                self._call(
                    what, lambda ipr: _tolerate_gone(ipr.link, "set", ifname=link, state="down")
                )
            case SetSysctl(name=sysctl, value=value):
                path = _sysctl.proc_path(sysctl)
                self._call(what, lambda _ipr: _write(path, value))
        return None

    def _create_bridge(self, step: CreateBridge, what: str) -> None:
        def create(ipr: Any) -> None:
            ipr.link("add", ifname=step.name, kind="bridge", address=step.mac.lower())
            try:
                ipr.link("set", ifname=step.name, ifalias=step.owner)
            except BaseException:
                # An untagged bridge would look foreign to every later step: take it away again.
                _tolerate_gone(ipr.link, "del", ifname=step.name)
                raise

        self._call(what, create)

    def attach_port(self, port: str, bridge: str) -> None:
        """One RTM_NEWLINK (port by name, master by cached index); on ENODEV the bridge index
        is looked up again once, in case the bridge was recreated."""

        def attach(ipr: Any) -> None:
            index = self._bridge_index.get(bridge)
            if index is not None:
                try:
                    ipr.link("set", ifname=port, master=index, state="up")
                    return
                except Exception as exc:
                    if getattr(exc, "code", None) not in (errno.ENODEV, errno.EINVAL):
                        raise
            msg = _get_link(ipr, bridge)
            if msg is None:
                raise BackendError(f"attach {port} to {bridge}: bridge {bridge} does not exist")
            self._bridge_index[bridge] = msg["index"]
            ipr.link("set", ifname=port, master=msg["index"], state="up")

        self._call(f"RTM_NEWLINK {port} master={bridge} flags=+UP", attach)

    def release_ports(self, ports: Sequence[str]) -> None:
        """Move the ports into this process's retiring group, then delete the group at once."""
        group = retiring_group()

        def release(ipr: Any) -> None:
            moved = 0
            for port in ports:
                try:
                    ipr.link("set", ifname=port, group=group)
                    moved += 1
                except Exception as exc:
                    if getattr(exc, "code", None) != errno.ENODEV:
                        raise
            if moved:
                try:
                    ipr.link("del", group=group)
                except Exception as exc:  # ENODEV: the group emptied itself meanwhile
                    if getattr(exc, "code", None) != errno.ENODEV:
                        raise

        self._call(f"RTM_NEWLINK group={group} x{len(ports)}, RTM_DELLINK group={group}",
                   release)

    def sweep(self, owner: str) -> list[str]:
        if not owner:
            raise BackendError("sweep: refusing an empty owner tag")
        removed = []
        for state in self.links():
            if state.alias == owner:
                self._call(f"RTM_DELLINK {state.name}", _deleter(state.name))
                removed.append(f"link {state.name} ({state.kind or 'device'}, {owner})")
        return removed


# --- helpers running on the worker thread ------------------------------------------------------


def _get_link(ipr: Any, name: str) -> Any:
    try:
        return ipr.link("get", ifname=name)[0]
    except Exception as exc:
        if getattr(exc, "code", None) in _GONE:
            return None
        raise


def _ifname_of(ipr: Any, index: int) -> str | None:
    try:
        return str(ipr.link("get", index=index)[0].get_attr("IFLA_IFNAME"))
    except Exception as exc:
        if getattr(exc, "code", None) in _GONE:
            return None
        raise


def _tolerate_gone(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as exc:
        if getattr(exc, "code", None) not in _GONE:
            raise


def _deleter(name: str) -> Callable[[Any], None]:
    """RTM_DELLINK by name; a link already gone is fine."""
    return lambda ipr: _tolerate_gone(ipr.link, "del", ifname=name)


def _broadcast(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str | None:
    """What `ip addr add … brd +` sets: the subnet's broadcast for IPv4 up to /30."""
    if iface.version == 4 and iface.network.prefixlen <= 30:
        return str(iface.network.broadcast_address)
    return None


def _add_address(ipr: Any, link: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                 ) -> None:
    msg = _get_link(ipr, link)
    if msg is None:
        raise BackendError(f"address {iface} on {link}: link {link} does not exist")
    extra: dict[str, str] = {}
    brd = _broadcast(iface)
    if brd is not None:
        extra["broadcast"] = brd
    ipr.addr("add", index=msg["index"], address=str(iface.ip),
             prefixlen=iface.network.prefixlen, **extra)


def _del_address(ipr: Any, link: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                 ) -> None:
    msg = _get_link(ipr, link)
    if msg is None:
        return
    try:
        ipr.addr("del", index=msg["index"], address=str(iface.ip),
                 prefixlen=iface.network.prefixlen)
    except Exception as exc:
        if getattr(exc, "code", None) not in (errno.EADDRNOTAVAIL, errno.ENODEV):
            raise


def _write(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as fh:
        fh.write(value)


def _link_state(msg: Any, addrs: list[Any], names: dict[int, Any]) -> LinkState:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    master = msg.get_attr("IFLA_MASTER")
    return LinkState(
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=str(kind or ""),
        mac=str(msg.get_attr("IFLA_ADDRESS") or "").lower(),
        alias=msg.get_attr("IFLA_IFALIAS"),
        up=bool(msg["flags"] & IFF_UP),
        addresses=tuple(
            f"{a.get_attr('IFA_LOCAL') or a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in addrs
        ),
        master=names.get(master) if master else None,
    )


def _as_backend_error(exc: BaseException, what: str) -> BaseException:
    if isinstance(exc, BackendError):
        return exc
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return BackendError(f"{what}: {os.strerror(code)} (errno {code})")
    if isinstance(exc, OSError):
        return BackendError(f"{what}: {exc.strerror or exc}")
    return BackendError(f"{what}: {type(exc).__name__}: {exc}")
