"""The relay in worker processes: connections spread over cores, the server-wide client limit,
and what happens when workers die."""

from __future__ import annotations

import os
import signal
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.helpers.guest import guest, ping, udhcpc
from tests.helpers.host_snapshot import snapshot
from tests.helpers.netns import sh
from tests.helpers.wsnic_proc import WsnicProcess, wsnic_running

pytestmark = pytest.mark.root

READY = "serving instance"


def write_profile(tmp_path, workers: int = 2, max_clients: int = 1024):
    path = tmp_path / "workers.yaml"
    path.write_text(
        f"name: wk\nserver:\n  workers: {workers}\n  max_clients: {max_clients}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    return str(path)


def worker_pids(proc: WsnicProcess) -> list[int]:
    line = proc.wait_for("worker processes (pids")
    return [int(p) for p in line.split("(pids ")[1].rstrip(")").split(", ")]


def connect_in(ns: str, url: str):
    """A WebSocket client inside `ns` (the server listens on the namespace's loopback)."""
    from wsnic.backends._netns import call_in_netns

    return call_in_netns(ns, lambda: connect(url, open_timeout=5))


def test_clients_are_spread_over_the_workers_and_talk_across_them(host, tmp_path):
    before = snapshot(host)
    with wsnic_running(host, ["apply", write_profile(tmp_path)], READY) as wsnic:
        assert len(worker_pids(wsnic)) == 2
        url = "ws://127.0.0.1:8086/"
        with guest(host, url, "wa") as a, guest(host, url, "wb") as b:
            ip_a, ip_b = udhcpc(a.ns)[0], udhcpc(b.ns)[0]
            assert ping(a.ns, ip_b.split("/")[0]) and ping(b.ns, ip_a.split("/")[0])
            wsnic.wait_for("[w0]: ")
            connected = [line for line in wsnic.lines if " connected on /" in line]
            assert any("[w0]" in line for line in connected), wsnic.output()
            assert any("[w1]" in line for line in connected), wsnic.output()
        wsnic.signal(signal.SIGTERM)
        assert wsnic.finish() == 0, wsnic.output()
    assert snapshot(host) == before


def test_the_client_limit_holds_across_workers(host, tmp_path):
    with wsnic_running(host, ["apply", write_profile(tmp_path, max_clients=2)], READY) as wsnic:
        url = "ws://127.0.0.1:8086/"
        with connect_in(host, url), connect_in(host, url):
            with pytest.raises(InvalidStatus) as refused:
                connect_in(host, url)
            assert refused.value.response.status_code == 503
            assert b"Server full" in refused.value.response.body
        # slots come back when clients leave
        deadline = time.monotonic() + 10
        while True:
            try:
                with connect_in(host, url):
                    break
            except InvalidStatus:
                assert time.monotonic() < deadline, wsnic.output()
                time.sleep(0.2)
        wsnic.signal(signal.SIGTERM)
        assert wsnic.finish() == 0


def test_a_dead_worker_is_reported_and_the_others_keep_serving(host, tmp_path):
    before = snapshot(host)
    proc = WsnicProcess(host, ["apply", write_profile(tmp_path)])
    try:
        proc.wait_for(READY)
        first, second = worker_pids(proc)
        os.kill(first, signal.SIGKILL)
        proc.wait_for(f"relay worker 0 (pid {first}) is gone")
        with guest(host, "ws://127.0.0.1:8086/", "wc") as g:
            assert udhcpc(g.ns) and ping(g.ns, "192.168.86.1")
        os.kill(second, signal.SIGKILL)
        proc.wait_for("every relay worker has died")
        assert proc.finish() == 1  # an error, but the host was restored first
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    assert snapshot(host) == before
    assert not list((tmp_path / "state").glob("*.journal"))
    assert "wstap" not in sh(["ip", "-o", "link"], netns=host).stdout
