"""Steps are data: JSON round-trips, and the inverse of the inverse is the step itself."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsnic.plan.steps import (
    STEP_TYPES,
    AddAddress,
    CreateBridge,
    InstallFirewall,
    IsolatedNetwork,
    NatNetwork,
    Ruleset,
    SetLinkUp,
    SetSysctl,
    StartProcess,
    Step,
    step_from_json,
)

names = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b)
)
owners = names.map(lambda n: f"wsnic:{n}")
values = st.sampled_from(["0", "1", "2"])
argv = st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5).map(tuple)
rulesets = st.builds(
    Ruleset,
    nat=st.lists(
        st.builds(NatNetwork, names, st.just("10.0.0.0/24"), names), max_size=3
    ).map(tuple),
    isolated=st.lists(st.builds(IsolatedNetwork, names), max_size=3).map(tuple),
)

steps: st.SearchStrategy[Step] = st.one_of(
    st.builds(CreateBridge, names, macs, owners),
    st.builds(AddAddress, names, st.just("10.1.2.1/24"), owners),
    st.builds(SetLinkUp, names, owners),
    st.builds(SetSysctl, st.just("net.ipv4.ip_forward"), values, values),
    st.builds(InstallFirewall, names, owners, rulesets),
    st.builds(StartProcess, names, argv, owners, st.just(("/run/x.leases",)),
              st.integers(1, 2**22), st.integers(0, 2**40)),
)


@given(steps)
def test_inverse_of_inverse_is_the_step(step: Step) -> None:
    assert step.inverse().inverse() == step
    assert step.inverse().key() == step.key()
    if not isinstance(step, SetSysctl):  # a sysctl's undo is another set, not a removal
        assert step.inverse().is_removal != step.is_removal


@given(steps)
def test_json_round_trip_of_step_and_inverse(step: Step) -> None:
    for s in (step, step.inverse()):
        text = json.dumps(s.to_json())
        assert step_from_json(json.loads(text)) == s


def test_every_step_type_is_registered() -> None:
    assert set(STEP_TYPES) == {cls.__name__ for cls in _all_subclasses(Step)}


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _all_subclasses(sub)
    return found


def test_unobserved_sysctl_has_no_inverse_yet() -> None:
    with pytest.raises(ValueError, match="previous value was never observed"):
        SetSysctl("net.ipv4.ip_forward", "1").inverse()


def test_unknown_step_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown step type"):
        step_from_json({"type": "FormatDisk"})


def test_descriptions_are_one_line() -> None:
    step = InstallFirewall("lab", "wsnic:lab", Ruleset(
        nat=(NatNetwork("wsbr0", "10.0.0.0/24", "eth0"),), isolated=(IsolatedNetwork("wsbr1"),)))
    assert step.describe() == "firewall ruleset wsnic lab: nat 10.0.0.0/24 via eth0, isolate wsbr1"
    assert "\n" not in step.inverse().describe()
