"""wsnic's command line: the only place where errors become exit codes.

    wsnic plan [PROFILE] [flags]       what apply would change (exit 0 none, 2 pending, 1 error)
    wsnic apply [PROFILE] [flags]      build the network, serve clients, give the host back on exit
    wsnic rollback [--instance N|--all] [--sweep]   undo what a crashed wsnic left behind
    wsnic status                       instances with a journal, their steps and drift
    wsnic validate FILE                check a profile or wsnic.conf and explain every error
    wsnic schema [--write]             the JSON Schema of a profile
    wsnic [original flags]             as the original wsnic: apply the flags and wsnic.conf
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from wsnic import __version__
from wsnic.config.loader import build_profile, detect_format, load_profile_file
from wsnic.config.models import Backends as BackendChoice
from wsnic.config.models import Profile
from wsnic.config.schema import render_schema, write_schema
from wsnic.config.seed import add_seed_flags, read_wsnic_conf
from wsnic.engine import signals
from wsnic.engine.executor import Backends
from wsnic.errors import ConfigError, WsnicError
from wsnic.logs import setup_logging
from wsnic.plan.render import Explain
from wsnic.plan.steps import Step

log = logging.getLogger("wsnic")

COMMANDS = ("plan", "apply", "rollback", "status", "validate", "schema")
EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2

DESCRIPTION = """\
wsnic connects WebSocket clients (the v86 emulator, jor1k, ...) to a real virtual Linux network:
each client gets its own TAP device on a shared bridge, with DHCP/DNS from dnsmasq, an optional
iperf server and optional NAT to the host's uplink. Everything it changes on the host is journaled
and given back on exit, or by `wsnic rollback` after a crash.

Run `wsnic COMMAND --help` for a command. Without a command, wsnic behaves as the original wsnic:
it applies the configuration built from its flags and wsnic.conf and serves until stopped."""


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _with_command(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    _setup_logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        code: int = args.handler(args)
        return code
    except ConfigError as exc:
        print(f"wsnic: configuration error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except WsnicError as exc:
        print(f"wsnic: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (KeyboardInterrupt, signals.Shutdown):
        print("wsnic: stopped before anything was changed", file=sys.stderr)
        return EXIT_OK


def _with_command(args: list[str]) -> list[str]:
    """Put the command first: `wsnic -v plan` means `wsnic plan -v`, and the original's bare
    flags (`wsnic -i -s 10.1.0.0/24`) mean `wsnic apply -i -s 10.1.0.0/24`."""
    if args and args[0] in ("-h", "--help", "--version"):
        return args
    leading = 0
    while leading < len(args) and args[leading] in ("-v", "-q"):
        leading += 1
    if leading < len(args) and args[leading] in COMMANDS:
        return [args[leading], *args[:leading], *args[leading + 1 :]]
    return ["apply", *args]


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1, not argparse's 2: for `plan`, 2 means "changes pending"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="wsnic", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"wsnic {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    plan = commands.add_parser(
        "plan", help="show the changes apply would make (exit 0: none, 2: pending, 1: error)",
        description="Compare the profile with the host and print each step: + to create, "
        "~ to change, = already in place and ours, ! in conflict with a foreign object. "
        "Never changes the host. Exit code 0 when nothing needs doing, 2 when changes are "
        "pending, 1 on error or conflict.",
    )
    _profile_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=cmd_plan)

    apply = commands.add_parser(
        "apply", help="build the network, serve clients until stopped, then restore the host",
        description="Apply the profile (steps journaled before they touch the host), serve "
        "WebSocket clients until SIGINT/SIGTERM, then undo every step and exit 0. Refuses when "
        "a foreign object is in the way or when a previous run left a journal.",
    )
    _profile_arguments(apply)
    apply.add_argument("--recover", action="store_true",
                       help="roll back a journal left by a crashed run first")
    apply.add_argument("--dry-run", action="store_true", help="only show the plan (as `plan`)")
    apply.set_defaults(handler=cmd_apply)

    rollback = commands.add_parser(
        "rollback", help="undo what a crashed or killed wsnic left on the host",
        description="Replay the journal's inverse steps, newest first. Idempotent. With "
        "--sweep, also remove objects tagged with the instance when no journal survived.",
    )
    which = rollback.add_mutually_exclusive_group()
    which.add_argument("--instance", default=None, help="instance name (default: wsnic)")
    which.add_argument("--all", action="store_true", help="every instance with a journal")
    rollback.add_argument("--sweep", action="store_true",
                          help="also remove leftovers tagged with the instance")
    _backend_arguments(rollback)
    _log_arguments(rollback)
    rollback.set_defaults(handler=cmd_rollback)

    status = commands.add_parser(
        "status", help="instances with a journal, their steps, liveness and drift",
    )
    status.add_argument("--json", action="store_true", help="print as JSON")
    _backend_arguments(status)
    _log_arguments(status)
    status.set_defaults(handler=cmd_status)

    validate = commands.add_parser(
        "validate", help="check a profile (YAML) or wsnic.conf and explain every error",
    )
    validate.add_argument("file", type=Path, metavar="FILE")
    _log_arguments(validate)
    validate.set_defaults(handler=cmd_validate)

    schema = commands.add_parser("schema", help="print the JSON Schema of a profile")
    schema.add_argument("--write", action="store_true",
                        help="write it to schemas/profile.schema.json instead")
    _log_arguments(schema)
    schema.set_defaults(handler=cmd_schema)
    return parser


def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "profile", nargs="?", type=Path, metavar="PROFILE",
        help="a YAML profile (profiles/*.yaml) or a wsnic.conf; default: wsnic.conf if present, "
        "else the built-in defaults (those of profiles/default.yaml)",
    )
    add_seed_flags(parser)  # the original's flags, which override the file
    _backend_arguments(parser)


def _backend_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backends")
    group.add_argument("--link-backend", choices=("iproute2", "netlink", "auto"),
                       help="links and addresses via `ip` or netlink (default: profile, auto)")
    group.add_argument("--firewall-backend", choices=("iptables", "nftables", "auto"),
                       help="NAT via iptables-restore or libnftables (default: profile, auto)")
    group.add_argument("--state-dir", type=Path, help="where journals live (default: /run/wsnic)")


def _log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", dest="verbose", action="store_true", help="verbose log messages")
    parser.add_argument("-q", dest="quiet", action="store_true", help="warnings and errors only")


def _setup_logging(verbose: bool, quiet: bool) -> None:
    setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


# --- profile and backends ----------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Profile:
    profile, warnings = build_profile(args.profile, args)
    for warning in warnings:
        log.warning("%s", warning)
    update: dict[str, Any] = {}
    if args.link_backend or args.firewall_backend:
        update["backends"] = BackendChoice(
            link=args.link_backend or profile.backends.link,
            firewall=args.firewall_backend or profile.backends.firewall,
        )
    if args.state_dir:
        update["state_dir"] = args.state_dir
    return profile.model_copy(update=update) if update else profile


@contextlib.contextmanager
def _backends_for(profile: Profile) -> Iterator[Backends]:
    from wsnic.backends.select import select_backends

    backends = select_backends(profile.backends.link, profile.backends.firewall)
    try:
        yield backends
    finally:
        backends.close()


def _explain(backends: Backends) -> Explain:
    def explain(step: Step) -> tuple[str, list[str]]:
        backend = backends.for_step(step)
        return backend.name, backend.commands(step)

    return explain


# --- commands ----------------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from wsnic.engine.lifecycle import backends_used
    from wsnic.engine.observe import observe
    from wsnic.plan.compiler import compile_plan
    from wsnic.plan.render import render_json, render_text

    profile = _load(args)
    with _backends_for(profile) as backends:
        plan = compile_plan(profile, observe(backends, profile.name))
        explain = _explain(backends)
        used = backends_used(backends)
        if getattr(args, "json", False):
            print(json.dumps(render_json(plan, explain, used), indent=2))
        else:
            line = ", ".join(f"{kind}={name}" for kind, name in used.items())
            asked = f"link={profile.backends.link}, firewall={profile.backends.firewall}"
            sys.stdout.write(render_text(plan, explain, f"{line} (asked: {asked})"))
    if plan.conflicts:
        return EXIT_ERROR
    return EXIT_PENDING if plan.pending else EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_plan(args)
    from wsnic.engine.lifecycle import apply_and_serve
    from wsnic.engine.serve import serve

    profile = _load(args)
    with _backends_for(profile) as backends:
        served = apply_and_serve(profile, backends, log.info, serve, recover=args.recover)
    log.info("host restored; bye" if served else "stopped before serving; host restored")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    from wsnic.engine.recovery import rollback_instances

    signals.hold_stop_signals(install=True)  # a rollback is never cut short
    state_dir = args.state_dir or Profile().state_dir
    rollback_instances(
        state_dir,
        instance=args.instance,
        all_instances=args.all,
        sweep=args.sweep,
        link_choice=args.link_backend,
        firewall_choice=args.firewall_backend,
        progress=log.info,
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from wsnic.engine.recovery import instance_status

    state_dir = args.state_dir or Profile().state_dir
    report = instance_status(state_dir, args.link_backend, args.firewall_backend)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not report["instances"]:
        print(f"no wsnic instance has a journal in {state_dir}")
    else:
        for inst in report["instances"]:
            state = "running" if inst["alive"] else "NOT running (run `wsnic rollback`)"
            print(f"instance {inst['instance']}: pid {inst['pid']} {state}; {inst['journal']}")
            for step in inst["steps"]:
                print(f"  {step['state']:<8} {step['description']}")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    if detect_format(path) == "conf":
        _, warnings = read_wsnic_conf(path)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        profile, _ = build_profile(path, None)
    else:
        profile = load_profile_file(path)
    nets = ", ".join(f"{n.name} {n.subnet} on {n.bridge}" for n in profile.networks)
    print(f"{path}: valid profile {profile.name!r} ({nets})")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    if args.write:
        print(f"wrote {write_schema()}")
    else:
        sys.stdout.write(render_schema())
    return EXIT_OK
