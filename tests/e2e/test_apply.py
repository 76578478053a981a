"""The real `wsnic` command end to end, inside throwaway namespaces: apply + serve + real DHCP
clients + ping + iperf + NAT, and the host given back exactly on every kind of exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.guest import guest, ping, stop_process, udhcpc
from tests.helpers.host_snapshot import snapshot
from tests.helpers.netns import netns, sh
from tests.helpers.wsnic_proc import WsnicProcess, run_wsnic, uplink_namespace, wsnic_running

pytestmark = pytest.mark.root

READY = "serving instance"
UPSTREAM_IP = "10.99.0.2"
ECHO_PORT = 7000

# Reports the peer's address to whoever connects: shows whether the source was masqueraded.
PEER_ECHO = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {ECHO_PORT}))
s.listen(8)
s.settimeout(60)
while True:
    conn, peer = s.accept()
    conn.sendall(peer[0].encode() + b"\\n")
    conn.close()
"""


def start_echo(ns: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PEER_ECHO],
                            text=True)
    deadline = time.monotonic() + 5
    while f":{ECHO_PORT}" not in sh(["ss", "-ltn"], netns=ns).stdout:
        assert time.monotonic() < deadline, "echo server did not start"
        time.sleep(0.05)
    return proc


def connect_from(ns: str, address: str, timeout: float = 2.0) -> str | None:
    """Connect from `ns` to address:ECHO_PORT; the peer address the server saw, or None."""
    code = (f"import socket; s = socket.create_connection(({address!r}, {ECHO_PORT}), "
            f"timeout={timeout}); print(s.recv(64).decode().strip())")
    result = sh([sys.executable, "-c", code], netns=ns, check=False, timeout=timeout + 5)
    return result.stdout.strip() if result.returncode == 0 else None


def dnsmasq_pids(ns: str) -> list[int]:
    """dnsmasq processes inside `ns` only (pgrep would also see other namespaces' ones)."""
    pids = []
    for pid in sh(["ip", "netns", "pids", ns]).stdout.split():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0].endswith(b"dnsmasq"):
                    pids.append(int(pid))
        except FileNotFoundError:
            continue
    return pids


def apply_args(profile: str, state_dir, *extra: str) -> list[str]:
    return ["apply", profile, "--state-dir", str(state_dir), *extra]


@pytest.mark.parametrize("link,firewall", [("netlink", "nftables"), ("iproute2", "iptables")])
def test_two_guests_get_leases_ping_and_iperf_then_sigterm_restores(host, tmp_path, link,
                                                                     firewall):
    before = snapshot(host)
    args = apply_args("profiles/default.yaml", tmp_path, "-p",
                      "--link-backend", link, "--firewall-backend", firewall)
    with wsnic_running(host, args, READY) as wsnic:
        url = "ws://127.0.0.1:8086/"
        with guest(host, url, "ga") as a, guest(host, url, "gb") as b:
            lease_a, lease_b = udhcpc(a.ns), udhcpc(b.ns)
            assert lease_a and lease_a[0].startswith("192.168.86."), wsnic.output()
            assert lease_b and lease_b[0].startswith("192.168.86.") and lease_a != lease_b
            assert ping(a.ns, "192.168.86.1") and ping(b.ns, "192.168.86.1")
            assert ping(a.ns, lease_b[0].split("/")[0])
            result = sh(["iperf", "-c", "192.168.86.1", "-t", "1", "-f", "m"], netns=a.ns,
                        timeout=20)
            assert "Mbits/sec" in result.stdout, result.stdout
        wsnic.signal(signal.SIGTERM)
        assert wsnic.finish() == 0, wsnic.output()
    assert "host restored" in wsnic.output()
    assert snapshot(host) == before
    assert not list(tmp_path.glob("*.journal"))


@pytest.mark.parametrize("firewall", ["nftables", "iptables"])
def test_nat_masquerades_guests_and_keeps_upstream_out(tmp_path, firewall):
    with netns("host") as host, netns("up") as upstream:
        uplink_namespace(host, upstream)
        sh(["ip", "route", "add", "10.86.0.0/16", "via", "10.99.0.1"], netns=upstream)
        echo_up = start_echo(upstream)
        try:
            before = snapshot(host)
            args = apply_args("profiles/lab.yaml", tmp_path, "--firewall-backend", firewall)
            with wsnic_running(host, args, READY) as wsnic:
                with guest(host, "ws://127.0.0.1:8086/internet", "gi") as inet, \
                        guest(host, "ws://127.0.0.1:8086/isolated", "gs") as iso:
                    inet_ip = udhcpc(inet.ns)[0].split("/")[0]
                    iso_ip = udhcpc(iso.ns)[0].split("/")[0]
                    assert inet_ip.startswith("10.86.1.") and iso_ip.startswith("10.86.2.")
                    # masqueraded: upstream sees the host's uplink address
                    assert connect_from(inet.ns, UPSTREAM_IP) == "10.99.0.1", wsnic.output()
                    # the isolated segment reaches nothing beyond its bridge
                    assert connect_from(iso.ns, UPSTREAM_IP) is None
                    assert ping(iso.ns, "10.86.2.1")
                    # upstream cannot open a connection to a guest
                    echo_guest = start_echo(inet.ns)
                    try:
                        assert connect_from(inet.ns, "127.0.0.1") == "127.0.0.1"
                        assert connect_from(upstream, inet_ip) is None
                    finally:
                        stop_process(echo_guest)
                wsnic.signal(signal.SIGINT)
                assert wsnic.finish() == 0, wsnic.output()
            assert snapshot(host) == before
        finally:
            stop_process(echo_up)


def test_foreign_objects_survive_apply_crash_and_rollback(tmp_path):
    with netns("host") as host, netns("up") as upstream:
        uplink_namespace(host, upstream)
        sh(["nft", "add", "table", "inet", "foreign"], netns=host)
        sh(["nft", "add", "chain", "inet", "foreign", "filterfwd",
            "{ type filter hook forward priority 10; policy accept; }"], netns=host)
        sh(["nft", "add", "rule", "inet", "foreign", "filterfwd", "tcp", "dport", "9999", "counter",
            "accept"], netns=host)
        sh(["iptables", "-A", "FORWARD", "-s", "172.31.0.0/16", "-j", "ACCEPT"], netns=host)
        sh(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.31.0.0/16", "-j",
            "MASQUERADE"], netns=host)
        sh(["ip", "link", "add", "br-foreign", "type", "bridge"], netns=host)
        before = snapshot(host)
        for firewall in ("iptables", "nftables"):
            state = tmp_path / firewall
            proc = WsnicProcess(host, apply_args("profiles/lab.yaml", state,
                                                 "--firewall-backend", firewall))
            try:
                proc.wait_for(READY)
                during = snapshot(host)
                assert "table inet foreign" in str(during["nft"])
                assert "-A FORWARD -s 172.31.0.0/16 -j ACCEPT" in during["iptables"]
                proc.signal(signal.SIGKILL)
                proc.finish()
            finally:
                if proc.proc.poll() is None:
                    proc.kill()
            result = run_wsnic(host, ["rollback", "--instance", "lab", "--state-dir", str(state)])
            assert result.returncode == 0, result.stderr
            assert snapshot(host) == before, f"{firewall}: foreign objects changed"


def test_a_foreign_wsbr0_makes_apply_refuse_before_changing_anything(host, tmp_path):
    sh(["ip", "link", "add", "wsbr0", "type", "bridge"], netns=host)
    before = snapshot(host)
    result = run_wsnic(host, apply_args("profiles/default.yaml", tmp_path))
    assert result.returncode == 1
    assert "wsbr0 already exists" in result.stderr and "not owned by wsnic:wsnic" in result.stderr
    assert snapshot(host) == before
    assert not list(tmp_path.glob("*.journal"))
    plan = run_wsnic(host, ["plan", "profiles/default.yaml", "--state-dir", str(tmp_path)])
    assert plan.returncode == 1 and "! bridge wsbr0" in plan.stdout


def test_a_step_failing_half_way_rolls_back_with_one_clear_error(host, tmp_path):
    # A foreign DNS server holds port 53 on every address: dnsmasq cannot start.
    blocker = subprocess.Popen(["ip", "netns", "exec", host, sys.executable, "-c",
                                "import socket, time\n"
                                "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                                "u.bind(('0.0.0.0', 53))\n"
                                "t = socket.socket(); t.bind(('0.0.0.0', 53)); t.listen()\n"
                                "time.sleep(60)\n"])
    try:
        deadline = time.monotonic() + 5
        while ":53 " not in sh(["ss", "-lun"], netns=host).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = snapshot(host)
        result = run_wsnic(host, apply_args("profiles/default.yaml", tmp_path))
        assert result.returncode == 1
        errors = [line for line in result.stderr.splitlines() if line.startswith("wsnic: error")]
        assert len(errors) == 1 and "dnsmasq" in errors[0], result.stderr
        assert "Address already in use" in result.stderr
        assert snapshot(host) == before
        assert not list(tmp_path.glob("*.journal"))
    finally:
        stop_process(blocker)


def test_lock_leftover_journal_recover_status_and_child_supervision(host, tmp_path):
    before = snapshot(host)
    args = apply_args("profiles/default.yaml", tmp_path)
    first = WsnicProcess(host, args)
    try:
        first.wait_for(READY)
        second = run_wsnic(host, args)
        assert second.returncode == 1 and "another wsnic runs instance 'wsnic'" in second.stderr

        status = json.loads(run_wsnic(host, ["status", "--json", "--state-dir",
                                             str(tmp_path)]).stdout)
        [inst] = status["instances"]
        assert inst["alive"] and {s["state"] for s in inst["steps"]} == {"ok"}

        # drift detection: the host matches the profile, so plan has nothing to do
        plan = run_wsnic(host, ["plan", "profiles/default.yaml", "--state-dir", str(tmp_path)])
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert "0 to create, 0 to change, 4 in place" in plan.stdout

        # dnsmasq dies: wsnic notices and starts it again
        [pid] = dnsmasq_pids(host)
        os.kill(pid, signal.SIGKILL)
        first.wait_for("restarting (1/5)")
        deadline = time.monotonic() + 10
        while True:
            found = dnsmasq_pids(host)
            if found and found != [pid]:
                break
            assert time.monotonic() < deadline, first.output()
            time.sleep(0.1)

        # someone removes the gateway address behind wsnic's back: both commands notice
        sh(["ip", "addr", "del", "192.168.86.1/24", "dev", "wsbr0"], netns=host)
        plan = run_wsnic(host, ["plan", "profiles/default.yaml", "--state-dir", str(tmp_path)])
        assert plan.returncode == 2 and "+ address 192.168.86.1/24 on wsbr0" in plan.stdout
        status = json.loads(run_wsnic(host, ["status", "--json", "--state-dir",
                                             str(tmp_path)]).stdout)
        drift = [s["description"] for s in status["instances"][0]["steps"]
                 if s["state"] == "DRIFT"]
        # (dnsmasq may notice its listen address went and be restarting too)
        assert "address 192.168.86.1/24 on wsbr0" in drift, status
        assert "bridge wsbr0 (mac 76:14:1c:2a:47:8f)" not in drift

        first.signal(signal.SIGKILL)
        first.finish()
    finally:
        if first.proc.poll() is None:
            first.kill()
    status = json.loads(run_wsnic(host, ["status", "--json", "--state-dir",
                                         str(tmp_path)]).stdout)
    assert not status["instances"][0]["alive"]
    refused = run_wsnic(host, args)
    assert refused.returncode == 1 and "wsnic rollback" in refused.stderr
    with wsnic_running(host, [*args, "--recover"], READY) as recovered:
        recovered.signal(signal.SIGTERM)
        assert recovered.finish() == 0
    assert snapshot(host) == before


def test_sigkill_with_clients_connected_then_rollback(host, tmp_path):
    before = snapshot(host)
    proc = WsnicProcess(host, apply_args("profiles/default.yaml", tmp_path))
    try:
        proc.wait_for(READY)
        with guest(host, "ws://127.0.0.1:8086/", "gk") as g:
            assert udhcpc(g.ns)
            taps = sh(["ip", "-o", "link", "show", "type", "tun"], netns=host).stdout
            assert "wstap" in taps
            proc.signal(signal.SIGKILL)
            proc.finish()
    finally:
        if proc.proc.poll() is None:
            proc.kill()
    result = run_wsnic(host, ["rollback", "--state-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert snapshot(host) == before


def test_bare_original_flags_apply_and_serve(host, tmp_path):
    """`wsnic -s SUBNET -p` as the original ran: the flags alone build and serve the network."""
    before = snapshot(host)
    with wsnic_running(host, ["-s", "10.77.0.0/24", "-p", "--state-dir", str(tmp_path)],
                       READY) as wsnic:
        with guest(host, "ws://127.0.0.1:8086/any/path?x=1", "gf") as g:
            assert udhcpc(g.ns)[0].startswith("10.77.0.")
            assert ping(g.ns, "10.77.0.1")
        wsnic.signal(signal.SIGTERM)
        assert wsnic.finish() == 0
    assert snapshot(host) == before


def test_guests_over_wss_with_the_originals_r_and_k_flags(host, tmp_path):
    """wss:// end to end: a throwaway certificate, `wsnic -r CRT -k KEY -p`, then DHCP, ping
    and iperf over TLS; a plain HTTPS request gets the original's certificate-test page."""
    cert, key = tmp_path / "cert.crt", tmp_path / "cert.key"
    sh(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)])
    before = snapshot(host)
    args = ["-r", str(cert), "-k", str(key), "-p", "--state-dir", str(tmp_path / "state")]
    with wsnic_running(host, args, READY) as wsnic:
        wsnic.wait_for("listening on wss://")  # 0.0.0.0 in a container, as the original
        url = "wss://127.0.0.1:8087/"
        with guest(host, url, "ta", insecure=True) as a, guest(host, url, "tb", insecure=True) as b:
            lease_a, lease_b = udhcpc(a.ns), udhcpc(b.ns)
            assert lease_a and lease_b and lease_a != lease_b
            assert ping(a.ns, lease_b[0].split("/")[0])
            result = sh(["iperf", "-c", "192.168.86.1", "-t", "1", "-f", "m"], netns=b.ns,
                        timeout=20)
            assert "Mbits/sec" in result.stdout
        page = sh(["curl", "-sk", "https://127.0.0.1:8087/"], netns=host, check=False)
        if page.returncode == 0:  # curl is optional on the machine; the relay tests cover it too
            assert "TLS test succeeded" in page.stdout
        wsnic.signal(signal.SIGTERM)
        assert wsnic.finish() == 0, wsnic.output()
    assert snapshot(host) == before
