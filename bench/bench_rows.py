"""The benchmark rows (what each measures, its metrics and target) and their summaries."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench_procs import WS_PORT

URL = f"ws://127.0.0.1:{WS_PORT}/"

Getter = Callable[[dict[str, Any]], float | None]


@dataclass(frozen=True)
class Metric:
    """One number of a run; `get` returns None when the run does not have it."""

    label: str
    get: Getter
    fmt: str = "{:.0f}"
    higher_is_better: bool = True


def lg(*path: str) -> Getter:
    def get(run_result: dict[str, Any]) -> float | None:
        value: Any = run_result.get("loadgen", {})
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return None if value is None or value == -1 else float(value)
    return get


def extra(key: str, scale: float = 1.0) -> Getter:
    def get(run_result: dict[str, Any]) -> float | None:
        value = run_result.get(key)
        return None if value is None else float(value) * scale
    return get


def srv(key: str, scale: float = 1.0) -> Getter:
    def get(run_result: dict[str, Any]) -> float | None:
        value = run_result.get("server", {}).get(key)
        return None if value is None else float(value) * scale
    return get


def per_ms(getter: Getter) -> Getter:
    def get(run_result: dict[str, Any]) -> float | None:
        value = getter(run_result)
        return None if value is None else value / 1000.0
    return get


RSS_PEAK_MB = Metric("rss peak MB", srv("rss_peak_kb", 1 / 1024), "{:.0f}", False)
PSS_PEAK_MB = Metric("pss peak MB", srv("pss_peak_kb", 1 / 1024), "{:.0f}", False)
CPU_PCT = Metric("cpu %", srv("cpu_pct"), "{:.0f}", False)


def growth_mb(prefix: str) -> Getter:
    """Peak minus start of the tree's `prefix` (rss, pss) in MB; None for results without it
    (PSS is missing from results made before it was measured)."""
    def get(run_result: dict[str, Any]) -> float | None:
        server = run_result.get("server", {})
        peak, start = server.get(f"{prefix}_peak_kb"), server.get(f"{prefix}_start_kb")
        if peak is None or start is None:
            return None
        return float(peak - start) / 1024
    return get


RSS_GROWTH_MB = Metric("rss growth MB", growth_mb("rss"), "{:.0f}", False)
PSS_GROWTH_MB = Metric("pss growth MB", growth_mb("pss"), "{:.0f}", False)


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # traffic | tcp | connect
    what: str
    target: str
    metrics: tuple[Metric, ...]
    args: tuple[str, ...] = ()
    timeout: float = 60.0
    ceiling: bool = False  # also measured against the trivial switch
    hold: float = 0.0  # connect rows: seconds the clients are held idle


def traffic(mode: str, *args: str) -> tuple[str, ...]:
    return (mode, "--url", URL, *args)


ROWS: tuple[Row, ...] = (
    Row("relay60", "traffic", "relay 60-byte frames A -> B, <= 256 in flight, 3 s",
        ">= 3x original", (
            Metric("frames/s", lg("frames_per_s")),
            Metric("Mbit/s", lg("mbit_per_s"), "{:.1f}"),
            Metric("loss", lg("loss_ratio"), "{:.4f}", False),
            Metric("p50 us", lg("latency_us", "p50"), "{:.0f}", False),
        ), traffic("relay", "--size", "60", "--window", "256", "--duration", "3"), 30, True),
    Row("relay1514", "traffic", "relay 1514-byte frames A -> B, <= 256 in flight, 3 s",
        ">= 5x original", (
            Metric("frames/s", lg("frames_per_s")),
            Metric("Mbit/s", lg("mbit_per_s"), "{:.0f}"),
            Metric("loss", lg("loss_ratio"), "{:.4f}", False),
        ), traffic("relay", "--size", "1514", "--window", "256", "--duration", "3"), 30, True),
    Row("tcp", "tcp", "guest DHCP lease, then iperf2 3 s guest->gateway and gateway->guest",
        ">= 3x / >= 2x original", (
            Metric("up Mbit/s", extra("up_mbit")),
            Metric("down Mbit/s", extra("down_mbit")),
            Metric("dhcp ms", extra("dhcp_s", 1000), "{:.0f}", False),
        ), (), 90),
    Row("latency", "traffic", "one-way latency, 60-byte frames, one in flight, 2 s",
        "p50 <= original", (
            Metric("p50 us", lg("latency_us", "p50"), "{:.1f}", False),
            Metric("p99 us", lg("latency_us", "p99"), "{:.1f}", False),
            Metric("frames/s", lg("frames_per_s")),
        ), traffic("relay", "--size", "60", "--window", "1", "--duration", "2"), 30, True),
    Row("overload1", "traffic", "one sender unpaced, 60-byte frames, 5 s",
        ">= 80% of relay60; RSS < 100 MB", (
            Metric("delivered/s", lg("frames_per_s")),
            Metric("% of relay60", extra("pct_of_relay60"), "{:.1f}"),
            RSS_PEAK_MB,
            PSS_PEAK_MB,
            Metric("p99 ms", per_ms(lg("latency_us", "p99")), "{:.1f}", False),
        ), traffic("overload", "--senders", "1", "--size", "60", "--duration", "5"), 60),
    Row("fair8", "traffic", "8 senders unpaced into one sink, 60-byte frames, 3 s",
        "Jain >= 0.9, none starved, RSS < 100 MB", (
            Metric("Jain", lg("jain"), "{:.3f}"),
            Metric("starved", lg("starved"), "{:.0f}", False),
            Metric("delivered/s", lg("frames_per_s")),
            RSS_PEAK_MB,
            PSS_PEAK_MB,
        ), traffic("overload", "--senders", "8", "--size", "60", "--duration", "3"), 60),
    Row("fair8paced", "traffic", "8 senders paced at 10k frames/s each (80k/s) into one sink, 3 s",
        "Jain >= 0.9, none starved", (
            Metric("Jain", lg("jain"), "{:.3f}"),
            Metric("starved", lg("starved"), "{:.0f}", False),
            Metric("delivered/s", lg("frames_per_s")),
            Metric("p99 ms", per_ms(lg("latency_us", "p99")), "{:.1f}", False),
            RSS_PEAK_MB,
            PSS_PEAK_MB,
        ), traffic("overload", "--senders", "8", "--rate", "10000", "--size", "60",
                   "--duration", "3"), 60),
    Row("slowreader", "traffic",
        "sender paced at 20k frames/s of 1514 B, sink reads 5k frames/s, 5 s",
        "RSS < 50 MB, p99 < 100 ms", (
            RSS_PEAK_MB,
            PSS_PEAK_MB,
            Metric("p99 ms", per_ms(lg("latency_us", "p99")), "{:.1f}", False),
            Metric("delivered/s", lg("frames_per_s")),
        ), traffic("overload", "--senders", "1", "--rate", "20000", "--sink-rate", "5000",
                   "--size", "1514", "--duration", "5"), 60),
    Row("connect100", "connect", "100 clients connect at the same moment (60 s limit)",
        "100 of 100 within 5 s", (
            Metric("within 5 s", lg("upgraded_within_s", "5")),
            Metric("within 60 s", lg("upgraded")),
            Metric("last ms", lg("upgrade_ms", "last"), "{:.0f}", False),
        ), ("--url", URL, "--clients", "100", "--timeout", "60"), 150, hold=1.0),
    Row("idle1000", "connect",
        "1000 idle clients connected one after the other, held 2 s, then all closed at once",
        "<= 2.9 s, <= 86 KB/client, teardown <= 3 s", (
            Metric("connect s", per_ms(lg("upgrade_ms", "last")), "{:.2f}", False),
            Metric("KB/client", extra("rss_per_client_kb"), "{:.1f}", False),
            Metric("pss KB/client", extra("pss_per_client_kb"), "{:.1f}", False),
            Metric("teardown s", extra("teardown_s"), "{:.2f}", False),
            Metric("upgraded", lg("upgraded")),
        ), ("--url", URL, "--clients", "1000", "--concurrency", "1", "--timeout", "60"), 200,
        hold=2.0),
)
ROW_NAMES = [r.name for r in ROWS]


# --- summary -----------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(row: Row, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median/min/max per metric over the runs that worked; the server's CPU, RSS and PSS over
    every run that has them (a server that crashed or was killed for its RSS still shows its
    peak)."""
    good = [r for r in runs if "error" not in r and "exception" not in r]
    summary: dict[str, Any] = {}
    for metric in row.metrics:
        values = [v for r in good if (v := metric.get(r)) is not None]
        summary[metric.label] = stats(values)
    for metric in (CPU_PCT, RSS_PEAK_MB, RSS_GROWTH_MB, PSS_PEAK_MB, PSS_GROWTH_MB):
        values = [v for r in runs if (v := metric.get(r)) is not None]
        summary[metric.label] = stats(values)
    summary["failed_runs"] = len(runs) - len(good)
    return summary


def fmt_value(metric: Metric, value: float | None) -> str:
    if value is None:
        return "-"
    if metric.fmt == "{:.0f}" and abs(value) >= 10000:
        return f"{value / 1000:.1f}k"
    return metric.fmt.format(value)


def row_line(row: Row, summary: dict[str, Any], ref: dict[str, Any] | None) -> str:
    head = row.metrics[0]
    s = summary.get(head.label)
    if s is None:
        text = f"{row.name:<11} {head.label:<13} {'no result':>30}"
    else:
        spread = f"[{fmt_value(head, s['min'])} .. {fmt_value(head, s['max'])}]"
        text = f"{row.name:<11} {head.label:<13} {fmt_value(head, s['median']):>9} {spread:<21}"
    others = []
    for metric in row.metrics[1:]:
        m = summary.get(metric.label)
        others.append(f"{metric.label} {fmt_value(metric, m['median'] if m else None)}")

    def median(metric: Metric) -> str:
        m = summary.get(metric.label)
        return fmt_value(metric, m["median"] if m else None)

    tail = (f"| cpu {median(CPU_PCT)}% rss {median(RSS_PEAK_MB)} MB (+{median(RSS_GROWTH_MB)}) "
            f"pss {median(PSS_PEAK_MB)} MB (+{median(PSS_GROWTH_MB)})")
    if summary.get("failed_runs"):
        tail += f" | {summary['failed_runs']} run(s) failed"
    line = f"{text} {'; '.join(others)} {tail}"
    if ref is not None:
        ratios = []
        for metric in row.metrics:
            mine, theirs = summary.get(metric.label), ref.get(metric.label)
            if not mine or not theirs:
                continue
            if not theirs["median"]:
                ratios.append(f"{metric.label} reference 0")
                continue
            ratio = mine["median"] / theirs["median"]
            verdict = "" if ratio == 1 else (
                " better" if (ratio > 1) == metric.higher_is_better else " worse")
            ratios.append(f"{metric.label} {ratio:.2f}x{verdict}")
        line += "\n" + " " * 12 + "vs reference: " + ("; ".join(ratios) or "-")
    return line
