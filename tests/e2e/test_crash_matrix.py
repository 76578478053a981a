"""Kill `wsnic apply` at every step boundary of the lab plan, with every backend pair, and check
the namespace comes back exactly: by `wsnic rollback` after SIGKILL, by wsnic itself after
SIGTERM or SIGINT."""

from __future__ import annotations

import signal

import pytest

from tests.helpers.host_snapshot import snapshot
from tests.helpers.wsnic_proc import WsnicProcess, run_wsnic

pytestmark = pytest.mark.root

LAB_STEPS = 11  # 2 networks x (bridge, address, up) + sysctl + firewall + 2 dnsmasq + iperf
PAIRS = [("iproute2", "iptables"), ("iproute2", "nftables"),
         ("netlink", "iptables"), ("netlink", "nftables")]


def _apply_args(state_dir, link, firewall):
    return ["apply", "profiles/lab.yaml", "--state-dir", str(state_dir),
            "--link-backend", link, "--firewall-backend", firewall]


def test_lab_plan_has_the_expected_number_of_steps(lab_host, tmp_path):
    host, _ = lab_host
    result = run_wsnic(host, ["plan", "profiles/lab.yaml", "--json", "--state-dir", str(tmp_path)])
    assert result.returncode == 2, result.stderr
    import json
    assert len(json.loads(result.stdout)["steps"]) == LAB_STEPS


@pytest.mark.parametrize("link,firewall", PAIRS)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT],
                         ids=["KILL", "TERM", "INT"])
def test_every_step_boundary_restores_the_host(lab_host, tmp_path, link, firewall, signum):
    host, _ = lab_host
    before = snapshot(host)
    for k in range(1, LAB_STEPS + 1):
        state_dir = tmp_path / f"k{k}"
        proc = WsnicProcess(host, _apply_args(state_dir, link, firewall),
                            env={"WSNIC_TEST_PAUSE_AFTER_STEP": str(k)})
        try:
            proc.wait_for(f"paused after step {k}")
            assert snapshot(host) != before, f"step {k} changed nothing visible"
            proc.signal(signum)
            code = proc.finish(timeout=30)
        finally:
            if proc.proc.poll() is None:
                proc.kill()
        if signum == signal.SIGKILL:
            assert (state_dir / "lab.journal").exists()
            result = run_wsnic(host, ["rollback", "--instance", "lab",
                                      "--state-dir", str(state_dir)])
            assert result.returncode == 0, result.stdout + result.stderr
            again = run_wsnic(host, ["rollback", "--instance", "lab",
                                     "--state-dir", str(state_dir)])
            assert again.returncode == 0, "rollback must be idempotent: " + again.stderr
        else:
            assert code == 0, proc.output()
        assert not (state_dir / "lab.journal").exists()
        assert snapshot(host) == before, f"after step {k}, signal {signum}:\n{proc.output()}"
