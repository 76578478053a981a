"""The executor on an in-memory FakeHost: journal first, undo on failure, rollback after a crash."""

from __future__ import annotations

import pytest

from wsnic.backends.fake import FakeBackend, FakeHost
from wsnic.config.models import Profile
from wsnic.engine.executor import Backends, execute, rollback
from wsnic.engine.journal import Journal
from wsnic.errors import PlanError, StepError
from wsnic.plan.compiler import compile_plan
from wsnic.plan.observed import LinkState, RouteState
from wsnic.plan.steps import StartProcess

LAB = Profile.model_validate({
    "name": "lab",
    "networks": [
        {"name": "inet", "path": "/inet", "bridge": "wsbr-inet", "subnet": "10.86.1.0/24",
         "nat": {"enabled": True}, "iperf": {"enabled": True}},
        {"name": "iso", "path": "/iso", "bridge": "wsbr-iso", "subnet": "10.86.2.0/24"},
    ],
})


def make_host() -> FakeHost:
    host = FakeHost()
    host.links["eth0"] = LinkState("eth0", "veth", "02:aa:00:00:00:01", up=True,
                                   addresses=("172.30.0.2/24",))
    host.routes.append(RouteState("default", "eth0"))
    host.routes.append(RouteState("172.30.0.0/24", "eth0"))
    return host


def backends_of(host: FakeHost) -> Backends:
    return Backends(FakeBackend(host, "fake-link"), FakeBackend(host, "fake-fw"),  # type: ignore[arg-type]
                    FakeBackend(host, "fake-proc"))  # type: ignore[arg-type]


def apply_lab(host: FakeHost, journal: Journal, lines: list[str]) -> None:
    plan = compile_plan(LAB, host.snapshot("lab"))
    journal.create()
    execute(plan, backends_of(host), journal, lines.append)


def test_apply_then_rollback_restores_the_host_exactly(tmp_path) -> None:
    host = make_host()
    before = host.state()
    lines: list[str] = []
    journal = Journal(tmp_path, "lab")
    apply_lab(host, journal, lines)
    assert host.links["wsbr-inet"].up and host.sysctls["net.ipv4.ip_forward"] == "1"
    assert "lab" in host.firewalls and len(host.processes) == 3  # 2 dnsmasq + 1 iperf
    assert lines[0].startswith("[1/") and lines[0].endswith("… ok")
    rollback(journal, backends_of(host), lines.append)
    assert host.state() == before
    assert not journal.exists()


@pytest.mark.parametrize("failing", ["AddAddress", "SetSysctl", "InstallFirewall", "StartProcess"])
def test_failure_half_way_undoes_everything_and_reports_the_step(tmp_path, failing) -> None:
    host = make_host()
    before = host.state()
    host.fail_on.add(failing)
    journal = Journal(tmp_path, "lab")
    with pytest.raises(StepError, match="injected fault") as info:
        apply_lab(host, journal, [])
    assert "failed" in str(info.value)
    host.fail_on.clear()
    assert host.state() == before
    assert not journal.exists()


def test_crash_after_every_step_then_rollback_restores(tmp_path) -> None:
    plan = compile_plan(LAB, make_host().snapshot("lab"))
    for k in range(len(plan.steps) + 1):
        host = make_host()
        before = host.state()
        journal = Journal(tmp_path, f"k{k}")
        journal.create()
        backends = backends_of(host)
        # What execute does, cut short after step k as a SIGKILL would.
        for planned in plan.steps[:k]:
            backend = backends.for_step(planned.step)
            resolved = backend.prepare(planned.step)
            seq = journal.begin(resolved, resolved.inverse())
            journal.done(seq, backend.apply(resolved))
        journal.close()
        rollback(Journal(tmp_path, f"k{k}"), backends, lambda _: None)
        assert host.state() == before, f"crash after step {k}"


def test_sysctl_old_value_comes_back(tmp_path) -> None:
    host = make_host()
    host.sysctls["net.ipv4.ip_forward"] = "1"  # already on: must stay on afterwards
    journal = Journal(tmp_path, "lab")
    apply_lab(host, journal, [])
    rollback(journal, backends_of(host), lambda _: None)
    assert host.sysctls["net.ipv4.ip_forward"] == "1"
    host.sysctls["net.ipv4.ip_forward"] = "0"
    apply_lab(host, journal, [])
    rollback(journal, backends_of(host), lambda _: None)
    assert host.sysctls["net.ipv4.ip_forward"] == "0"


def test_child_pid_learnt_while_applying_is_journaled(tmp_path) -> None:
    host = make_host()
    journal = Journal(tmp_path, "lab")
    apply_lab(host, journal, [])
    stops = [e.inverse for e in journal.entries() if isinstance(e.step, StartProcess)]
    assert sorted(s.pid for s in stops) == sorted(host.processes)  # type: ignore[attr-defined]


def test_rollback_resumes_after_being_interrupted(tmp_path) -> None:
    host = make_host()
    before = host.state()
    journal = Journal(tmp_path, "lab")
    apply_lab(host, journal, [])
    journal.close()
    host.fail_on.add("DeleteBridge")  # the first rollback gets stuck at the bridges
    with pytest.raises(Exception, match="could not be undone"):
        rollback(Journal(tmp_path, "lab"), backends_of(host), lambda _: None)
    assert Journal(tmp_path, "lab").exists()
    host.fail_on.clear()
    applied_before = len(host.applied)
    rollback(Journal(tmp_path, "lab"), backends_of(host), lambda _: None)
    assert host.state() == before
    # only the steps that were not undone the first time ran again
    assert all(type(s).__name__ in {"DeleteBridge"} for s in host.applied[applied_before:])


def test_conflict_refuses_before_touching_anything(tmp_path) -> None:
    host = make_host()
    host.links["wsbr-iso"] = LinkState("wsbr-iso", "bridge", "02:00:00:00:00:99")  # foreign
    before = host.state()
    with pytest.raises(PlanError, match="wsbr-iso already exists"):
        apply_lab(host, Journal(tmp_path, "lab"), [])
    assert host.state() == before and host.applied == []
