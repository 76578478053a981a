"""The command line's contract with scripts: exit codes, the original's bare flags, signals."""

from __future__ import annotations

import os
import signal

import pytest

from wsnic.cli import _with_command, main
from wsnic.engine import signals


def test_usage_errors_exit_1_not_2_because_plan_uses_2_for_pending(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "--link-backend", "carrier-pigeon"])
    assert info.value.code == 1
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["-i", "-s", "10.1.0.0/24"], ["apply", "-i", "-s", "10.1.0.0/24"]),
    ([], ["apply"]),
    (["-v", "plan", "x.yaml"], ["plan", "-v", "x.yaml"]),
    (["-q", "-v", "rollback"], ["rollback", "-q", "-v"]),
    (["status", "-v"], ["status", "-v"]),
    (["--help"], ["--help"]),
])
def test_command_comes_first_and_bare_flags_mean_apply(argv, expected) -> None:
    assert _with_command(argv) == expected


def test_validate_reports_errors_with_exit_1(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("networks:\n  - subnet: 10.0.0.1/24\n")
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "networks[0].subnet" in err


def test_validate_accepts_the_shipped_profiles(capsys) -> None:
    assert main(["validate", "profiles/lab.yaml"]) == 0
    assert "valid profile 'lab'" in capsys.readouterr().out


def test_stop_signal_modes() -> None:
    old = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
    try:
        signals.raise_on_stop()
        with pytest.raises(signals.Shutdown):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1)  # let the handler run
        # the first signal switched to holding: a second one is only logged
        os.kill(os.getpid(), signal.SIGTERM)
        seen: list[int] = []
        signals.call_on_stop(seen.append)
        os.kill(os.getpid(), signal.SIGHUP)
        assert seen == [signal.SIGHUP]
        signals.hold_stop_signals()
        os.kill(os.getpid(), signal.SIGINT)  # held: no KeyboardInterrupt, no Shutdown
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
