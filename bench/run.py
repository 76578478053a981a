#!/usr/bin/env python3
"""wsnic benchmarks: one command, every row, median/min/max over several runs.

    python3 bench/run.py [--runs 3] [--only ROW,...] [--server-cmd 'CMD ...'] [--json out.json]

Needs root (network namespaces, TAPs) and a C compiler. Each run of a row gets a fresh
`wsnt-bench-*` namespace and a fresh server inside it (`ip netns exec`); the C load generator
(bench/loadgen.c, compiled here) talks to it on 127.0.0.1:8086 inside that namespace. Server
CPU, RSS and PSS are read from /proc for the server's process tree. Namespaces are deleted, and
the processes in them stopped by PID, even on failure or Ctrl-C. See bench/README.md.

bench_procs.py holds the namespace/process/proc plumbing, bench_rows.py what each row measures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_procs import (
    WS_PORT,
    BenchError,
    Monitor,
    Namespaces,
    Server,
    ServerSpec,
    link_count,
    listening,
    log,
    run,
    stop_pid,
)
from bench_rows import (
    ROW_NAMES,
    ROWS,
    URL,
    Row,
    fmt_value,
    lg,
    row_line,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
IPERF_PORT = 5001
GATEWAY = "192.168.86.1"

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface" ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-$subnet}" dev "$interface" ;;
esac
exit 0
"""


# --- the load generator --------------------------------------------------------------------


def build(build_dir: Path) -> dict[str, Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler (cc) found")
    build_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    header = BENCH / "ws_common.h"
    for name in ("loadgen", "trivial_switch"):
        src, binary = BENCH / f"{name}.c", build_dir / name
        newest = max(src.stat().st_mtime, header.stat().st_mtime)
        if not binary.exists() or binary.stat().st_mtime < newest:
            result = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", str(binary), str(src),
                                     "-lm"], capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise SystemExit(f"compiling {src} failed:\n{result.stderr}")
        out[name] = binary
    return out


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            value: dict[str, Any] = json.loads(line)
            return value
    raise BenchError(f"no JSON result in the load generator's output: {text[-300:]!r}")


def loadgen(binary: Path, ns: str, args: Sequence[str], timeout: float) -> dict[str, Any]:
    result = run([str(binary), *args], timeout=timeout, check=False, ns=ns)
    if result.returncode not in (0, 1):
        raise BenchError(f"loadgen {' '.join(args)} exited {result.returncode}: "
                         f"{result.stderr.strip()[-300:]}")
    return last_json(result.stdout)


# --- one run of a row ----------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    bins: dict[str, Path]
    spaces: Namespaces
    spec: ServerSpec
    work: Path
    results: dict[str, Any] = field(default_factory=dict)


def run_traffic(ctx: Context, row: Row, ns: str, server: Server | None) -> dict[str, Any]:
    if server is not None:
        server.monitor.begin()
    result = loadgen(ctx.bins["loadgen"], ns, row.args, row.timeout)
    out: dict[str, Any] = {"loadgen": result}
    if server is not None:
        out["server"] = server.monitor.end()
    if not result.get("ok"):
        out["error"] = result.get("error")
    return out


def _iperf_bps(csv_out: str) -> float:
    """bits/s from the last line of `iperf -y C` (the last field)."""
    lines = [line for line in csv_out.splitlines() if line.count(",") >= 8]
    if not lines:
        raise BenchError(f"no iperf result in {csv_out[-200:]!r}")
    return float(lines[-1].rsplit(",", 1)[1])


def run_tcp(ctx: Context, row: Row, ns: str, server: Server) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while not listening(server.pid, IPERF_PORT):
        if time.monotonic() > deadline:
            raise BenchError(f"no iperf server listening on {GATEWAY}:{IPERF_PORT} in the "
                             "server's namespace (start the server with -p)")
        time.sleep(0.05)
    out: dict[str, Any] = {}
    with ctx.spaces.scoped("guest") as guest:
        run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
             "net.ipv6.conf.default.disable_ipv6=1"], ns=guest)
        connector = subprocess.Popen(
            ["ip", "netns", "exec", ns, str(ctx.bins["loadgen"]), "tap", "--url", URL,
             "--guest-ns", guest, "--tap", "eth0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert connector.stdout is not None
            ready = _read_line(connector.stdout, "READY", 15)
            if ready is None:
                raise BenchError("the TAP connector did not come up")
            run(["ip", "link", "set", "eth0", "up"], ns=guest)
            script = ctx.work / "udhcpc.sh"
            script.write_text(UDHCPC_SCRIPT)
            script.chmod(0o755)
            server.monitor.begin()
            t0 = time.monotonic()
            run(["busybox", "udhcpc", "-f", "-n", "-q", "-t", "5", "-T", "1", "-i", "eth0",
                 "-s", str(script)], timeout=20, ns=guest)
            out["dhcp_s"] = round(time.monotonic() - t0, 4)
            addr = run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], ns=guest).stdout.split()
            guest_ip = next((a.split("/")[0] for a in addr if "/" in a), None)
            if guest_ip is None:
                raise BenchError("the guest got no DHCP lease")
            out["guest_ip"] = guest_ip
            secs = str(ctx.args.tcp_seconds)
            up = run(["iperf", "-c", GATEWAY, "-t", secs, "-y", "C"],
                     timeout=ctx.args.tcp_seconds + 20, ns=guest)
            out["up_mbit"] = round(_iperf_bps(up.stdout) / 1e6, 1)
            sink = subprocess.Popen(["ip", "netns", "exec", guest, "iperf", "-s", "-B", guest_ip,
                                     "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                listen_deadline = time.monotonic() + 5
                while not listening(sink.pid, IPERF_PORT) and time.monotonic() < listen_deadline:
                    time.sleep(0.05)
                down = run(["iperf", "-c", guest_ip, "-B", GATEWAY, "-t", secs, "-y", "C"],
                           timeout=ctx.args.tcp_seconds + 20, ns=ns)
                out["down_mbit"] = round(_iperf_bps(down.stdout) / 1e6, 1)
            finally:
                stop_pid(sink, [(signal.SIGTERM, 3.0)])
            out["server"] = server.monitor.end()
        finally:
            stop_pid(connector, [(signal.SIGTERM, 3.0)])
            rest = connector.communicate(timeout=5)[0] if connector.stdout else ""
            with contextlib.suppress(BenchError):
                out["loadgen"] = last_json(rest)
    return out


def _read_line(stream: Any, prefix: str, timeout: float) -> str | None:
    """The first line starting with `prefix` from a pipe, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([stream], [], [], left)
        if not ready:
            return None
        line = stream.readline()
        if not line:
            return None
        if line.startswith(prefix):
            return str(line.strip())
    return None


def run_connect(ctx: Context, row: Row, ns: str, server: Server) -> dict[str, Any]:
    base_links = link_count(server.pid)
    server.monitor.begin()
    base_rss, base_pss = server.monitor.sample(force_pss=True)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, str(ctx.bins["loadgen"]), "connect", *row.args,
         "--hold", "120", "--close-timeout", "90"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    out: dict[str, Any] = {}
    try:
        assert proc.stderr is not None and proc.stdin is not None
        timeout = float(row.args[row.args.index("--timeout") + 1]) + 15
        if _read_line(proc.stderr, "UPGRADED", timeout) is None:
            raise BenchError("the load generator never reported its connections")
        clients = int(row.args[row.args.index("--clients") + 1])
        out["links_with_clients"] = link_count(server.pid) - base_links
        time.sleep(row.hold / 2)
        held_rss, held_pss = server.monitor.sample(force_pss=True)
        time.sleep(row.hold / 2)
        rss, pss = server.monitor.sample(force_pss=True)
        held_rss, held_pss = max(held_rss, rss), max(held_pss, pss)
        out["rss_base_kb"], out["rss_held_kb"] = base_rss, held_rss
        out["rss_per_client_kb"] = round((held_rss - base_rss) / clients, 2)
        out["pss_base_kb"], out["pss_held_kb"] = base_pss, held_pss
        out["pss_per_client_kb"] = round((held_pss - base_pss) / clients, 2)
        # Teardown: from "close" until the server's namespace is back to its own interfaces.
        t0 = time.monotonic()
        proc.stdin.write("close\n")
        proc.stdin.flush()
        deadline = t0 + ctx.args.teardown_timeout
        while link_count(server.pid) > base_links and time.monotonic() < deadline:
            time.sleep(0.02)
        left = link_count(server.pid) - base_links
        out["teardown_s"] = round(time.monotonic() - t0, 3) if left <= 0 else None
        out["links_left"] = max(left, 0)
        stdout, _ = proc.communicate(timeout=100)
        out["loadgen"] = last_json(stdout)
        out["server"] = server.monitor.end()
    finally:
        stop_pid(proc, [(signal.SIGTERM, 3.0)])
    return out


def measure(ctx: Context, row: Row, index: int) -> dict[str, Any]:
    """One run of a row: fresh namespace, fresh server, measure, stop, delete."""
    with ctx.spaces.scoped(row.name[:8]) as ns:
        log_path = ctx.work / f"server-{row.name}-{index}.log"
        t0 = time.monotonic()
        server = Server(ctx.spec, ns, log_path, ctx.args.rss_limit_mb * 1024)
        started = time.monotonic() - t0
        try:
            if row.kind == "traffic":
                out = run_traffic(ctx, row, ns, server)
            elif row.kind == "tcp":
                out = run_tcp(ctx, row, ns, server)
            else:
                out = run_connect(ctx, row, ns, server)
            if not server.alive():
                code = server.proc.returncode
                out["error"] = "; ".join(filter(None, [out.get("error"),
                                                       f"the server exited ({code})"]))
            if "error" in out:
                out["server_log"] = server.tail()
        finally:
            stopped = server.stop()
        out["server_start_s"] = round(started, 2)
        out["server_stop_s"] = round(stopped, 2)
        return out


def measure_ceiling(ctx: Context, row: Row) -> dict[str, Any]:
    with ctx.spaces.scoped("switch") as ns:
        switch = subprocess.Popen(
            ["ip", "netns", "exec", ns, str(ctx.bins["trivial_switch"]), "--port", str(WS_PORT),
             "--duration", "300"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 10
            while not listening(switch.pid, WS_PORT):
                if switch.poll() is not None or time.monotonic() > deadline:
                    raise BenchError("the trivial switch did not start")
                time.sleep(0.02)
            monitor = Monitor(switch, ctx.args.rss_limit_mb * 1024)
            try:
                monitor.begin()
                out = run_traffic(ctx, row, ns, None)
                out["server"] = monitor.end()
            finally:
                monitor.close()
        finally:
            stop_pid(switch, [(signal.SIGTERM, 3.0)])
        return out


# --- main --------------------------------------------------------------------------------------


def cpu_busy_pct(seconds: float) -> float:
    """How busy all CPUs were over the next `seconds` (from /proc/stat), in percent."""
    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return round(100.0 * (1 - (idle1 - idle0) / max(total1 - total0, 1)), 1)


def wsnic_python(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [sys.executable, str(ROOT / ".venv/bin/python")]
    for python in candidates:
        if python and Path(python).exists() and subprocess.run(
                [python, "-c", "import wsnic.cli"], capture_output=True, cwd=ROOT).returncode == 0:
            return python
    raise SystemExit("cannot find a Python that imports wsnic: run this with the project's "
                     "virtualenv Python or pass --python")


def default_server(args: argparse.Namespace, work: Path) -> ServerSpec:
    # A private instance name, so that tags and journal never meet another instance's (a test
    # running meanwhile; before e3206ff wsnic even adopted same-named children machine-wide).
    instance = f"wsnb{uuid.uuid4().hex[:8]}"
    profile = work / "profile.yaml"
    text = (ROOT / "profiles" / "default.yaml").read_text()
    lines = [f"name: {instance}" if line.startswith("name:") else line
             for line in text.splitlines()]
    profile.write_text("\n".join(lines) + "\n")
    state = work / "state"
    state.mkdir(exist_ok=True)
    python = wsnic_python(args.python)
    return ServerSpec([python, "-m", "wsnic", "apply", str(profile), "-p", "--state-dir",
                       str(state)], ROOT)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per row (default 3, >= 1)")
    parser.add_argument("--only", help=f"comma-separated rows: {','.join(ROW_NAMES)}")
    parser.add_argument("--server-cmd",
                        help="another server speaking the protocol on 127.0.0.1:8086 (run "
                             "inside the namespace with `ip netns exec`), e.g. 'python3 -m "
                             "wsnic -p -a 127.0.0.1' with --server-cwd /tmp/orig")
    parser.add_argument("--server-cwd", type=Path, help="working directory of --server-cmd")
    parser.add_argument("--python", help="Python with wsnic installed (default: this one)")
    parser.add_argument("--json", type=Path, help="raw results (default bench/results/DATE.json)")
    parser.add_argument("--compare", type=Path, help="a previous --json to print ratios against")
    parser.add_argument("--no-ceiling", action="store_true",
                        help="skip the trivial-switch calibration")
    parser.add_argument("--build-dir", type=Path, default=BENCH / "results" / "build")
    parser.add_argument("--rss-limit-mb", type=int, default=6144,
                        help="kill a server whose process tree grows beyond this (default 6144)")
    parser.add_argument("--tcp-seconds", type=int, default=3, help="iperf duration (default 3)")
    parser.add_argument("--teardown-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1..20")
    if args.only:
        unknown = set(args.only.split(",")) - set(ROW_NAMES)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROW_NAMES)}")
    return args


class Interrupted(Exception):
    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root: network namespaces and TAP devices")
    for tool in ("ip", "iperf", "busybox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed")
    # Also SIGINT: a shell starts background jobs with it ignored, and Python then keeps it so.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    rows = [r for r in ROWS if not args.only or r.name in args.only.split(",")]
    bins = build(args.build_dir)
    spaces = Namespaces()
    reference = None
    if args.compare:
        reference = json.loads(args.compare.read_text()).get("summary", {})
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    json_path = args.json or BENCH / "results" / f"{stamp}.json"
    results: dict[str, Any] = {"meta": {}, "ceiling": {}, "rows": {}, "summary": {},
                               "ceiling_summary": {}}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wsnt-bench-") as tmp:
        work = Path(tmp)
        if args.server_cmd:
            spec = ServerSpec(shlex.split(args.server_cmd), args.server_cwd or ROOT)
        else:
            spec = default_server(args, work)
        results["meta"] = {
            "date": stamp, "argv": sys.argv, "server_argv": spec.argv, "server_cwd": str(spec.cwd),
            "runs": args.runs, "cpus": os.cpu_count(), "kernel": os.uname().release,
            "cpu_busy_before_pct": cpu_busy_pct(1.0),
            "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                     capture_output=True, text=True).stdout.strip(),
        }
        ctx = Context(args, bins, spaces, spec, work, results)
        log(f"server: {shlex.join(spec.argv)}")
        if results["meta"]["cpu_busy_before_pct"] > 10:
            log(f"warning: the CPUs were {results['meta']['cpu_busy_before_pct']:.0f} % busy "
                "before the start: something else is running, and the numbers will show it")
        try:
            if not args.no_ceiling:
                for row in (r for r in rows if r.ceiling):
                    runs = []
                    for i in range(args.runs):
                        log(f"ceiling {row.name} run {i + 1}/{args.runs}: trivial switch")
                        try:
                            runs.append(measure_ceiling(ctx, row))
                        except BenchError as exc:
                            log(f"  failed: {exc}")
                            runs.append({"exception": str(exc)})
                    results["ceiling"][row.name] = runs
                    results["ceiling_summary"][row.name] = summarize(row, runs)
            for row in rows:
                runs = []
                for i in range(args.runs):
                    log(f"{row.name} run {i + 1}/{args.runs}: {row.what}")
                    try:
                        result = measure(ctx, row, i)
                    except BenchError as exc:
                        log(f"  failed: {exc}")
                        result = {"exception": str(exc)}
                    runs.append(result)
                    head = row.metrics[0].get(result) if "exception" not in result else None
                    note = result.get("error") or result.get("exception") or ""
                    log(f"  {row.metrics[0].label}: {fmt_value(row.metrics[0], head)} {note}")
                if row.name == "overload1":
                    base = results["summary"].get("relay60", {}).get("frames/s")
                    for r in runs:
                        got = lg("frames_per_s")(r)
                        if base and got is not None:
                            r["pct_of_relay60"] = round(100.0 * got / base["median"], 1)
                results["rows"][row.name] = runs
                results["summary"][row.name] = summarize(row, runs)
        except (KeyboardInterrupt, Interrupted) as exc:
            log(f"interrupted ({exc or 'SIGINT'}): cleaning up; partial results follow")
            results["meta"]["interrupted"] = True
        finally:
            spaces.delete_all()
    results["meta"]["elapsed_s"] = round(time.monotonic() - t_start, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print_report(rows, results, reference, json_path)
    return 0


def print_report(rows: list[Row], results: dict[str, Any], reference: dict[str, Any] | None,
                 json_path: Path) -> None:
    meta = results["meta"]
    print(f"\nwsnic bench {meta['date']}  server: {shlex.join(meta['server_argv'])}")
    print(f"{meta['runs']} run(s) per row, median [min .. max]; cpu/rss/pss of the server's "
          f"process tree, rss and pss peak (+growth during the row); {meta['cpus']} CPUs, kernel "
          f"{meta['kernel']}, {meta.get('elapsed_s')} s; CPUs "
          f"{meta['cpu_busy_before_pct']:.0f} % busy before\n")
    for row in rows:
        if row.name not in results["summary"]:
            continue
        print(row_line(row, results["summary"][row.name],
                       reference.get(row.name) if reference else None))
        print(f"{'':12}{row.what}; target: {row.target}")
    if results["ceiling_summary"]:
        print("\nceiling: the load generator against bench/trivial_switch.c (no TAPs, no bridge)")
        for row in rows:
            if row.name in results["ceiling_summary"]:
                print(row_line(row, results["ceiling_summary"][row.name], None))
    print(f"\nraw results: {json_path}")


if __name__ == "__main__":
    sys.exit(main())
