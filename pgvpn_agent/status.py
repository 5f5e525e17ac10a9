"""`pgvpn status`: what `wg show` says about a WireGuard interface, read from a running agent.

Everything comes from the agent's metrics endpoint, so status works wherever Prometheus does
and needs no database access. Two scrapes `interval` seconds apart give current rates; with
interval 0 the rates are averages since the agent started.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from pgvpn_agent import config as configuration

DEFAULT_CONFIG = Path("/etc/pgvpn/pgvpn.toml")
DEFAULT_URL = "http://127.0.0.1:9478/metrics"

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def locate(url: str | None, config: Path | None) -> str:
    """--url, else the endpoint of --config, else of the default config, else localhost."""
    if url:
        return url
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    return url_from_config(config) if config is not None else DEFAULT_URL


def url_from_config(path: Path) -> str:
    """The endpoint an agent with this config serves; wildcard addresses mean this host."""
    metrics = configuration.load(path).metrics
    if not metrics.enabled:
        raise configuration.ConfigError(
            f"{path}: metrics.enabled is false; pgvpn status reads the agent's metrics")
    address = ipaddress.ip_address(metrics.address)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    host = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{host}:{metrics.port}/metrics"


def scrape(url: str, timeout: float = 5.0) -> Samples:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"cannot read metrics from {url}: {reason} (is the agent running?)")\
            from None
    return parse(text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def summarize(first: Samples, second: Samples | None = None, elapsed: float = 0.0,
              now: float | None = None) -> dict[str, Any]:
    """The status as plain data (the --json output). Rates: second minus first over elapsed,
    or, without a second scrape, totals over the agent's uptime."""
    now = time.time() if now is None else now
    last = second if second is not None else first
    started = _one(last, "process_start_time_seconds")
    uptime = now - started if started is not None else None
    if second is not None and elapsed > 0:
        window, base = elapsed, first
    else:
        window, base = (uptime or 0.0), {}

    def rate(name: str, **labels: str) -> float | None:
        if window <= 0:
            return None
        return max(0.0, _sum(last, name, **labels) - _sum(base, name, **labels)) / window

    agent = _labels_of(last, "pgvpn_agent_info")
    build = _labels_of(last, "pgvpn_build_info")
    peers = sorted({dict(labels)["peer"] for (name, labels) in last
                    if name == "pgvpn_packets_total"})
    peer_rows = []
    for peer in peers:
        row: dict[str, Any] = {"name": peer}
        for d in ("rx", "tx"):
            row[f"{d}_bytes"] = _sum(last, "pgvpn_bytes_total", direction=d, peer=peer)
            row[f"{d}_packets"] = _sum(last, "pgvpn_packets_total", direction=d, peer=peer)
            r = rate("pgvpn_bytes_total", direction=d, peer=peer)
            row[f"{d}_bits_per_second"] = None if r is None else r * 8
            row[f"{d}_packets_per_second"] = rate("pgvpn_packets_total", direction=d, peer=peer)
            at = _one(last, "pgvpn_last_packet_timestamp_seconds", direction=d, peer=peer)
            row[f"last_{d}_seconds_ago"] = None if at is None else max(0.0, now - at)
        row["lag_packets"] = _one(last, "pgvpn_cursor_lag_packets", peer=peer)
        row["lag_seconds"] = _one(last, "pgvpn_cursor_lag_seconds", peer=peer)
        peer_rows.append(row)
    return {
        "peer": agent.get("peer"),
        "mode": agent.get("mode"),
        "version": build.get("version"),
        "uptime_seconds": uptime,
        "rate_window_seconds": window,
        "rates_since_start": base is not first,
        "database": {
            d: {"up": _one(last, "pgvpn_db_up", direction=d) == 1.0,
                "reconnects": _sum(last, "pgvpn_db_reconnects_total", direction=d)}
            for d in ("tx", "rx")
        },
        "queue_packets": _one(last, "pgvpn_queue_depth_packets"),
        "inserts": {
            "batches": _sum(last, "pgvpn_insert_batches_total"),
            "batches_per_second": rate("pgvpn_insert_batches_total"),
            "packets_per_batch": _mean(last, base, "pgvpn_insert_batch_size_packets"),
            "latency_p50_seconds": _quantile(0.5, last, base, "pgvpn_insert_duration_seconds"),
            "latency_p99_seconds": _quantile(0.99, last, base, "pgvpn_insert_duration_seconds"),
        },
        "delivery": {
            "latency_p50_seconds": _quantile(0.5, last, base, "pgvpn_delivery_latency_seconds"),
            "latency_p99_seconds": _quantile(0.99, last, base, "pgvpn_delivery_latency_seconds"),
        },
        "drops": {dict(labels)["reason"]: value for (name, labels), value in sorted(last.items())
                  if name == "pgvpn_packets_dropped_total"},
        "peers": peer_rows,
    }


def render(status: dict[str, Any]) -> str:
    """Human-readable, in the spirit of `wg show`."""
    db = status["database"]
    reconnects = int(db["tx"]["reconnects"] + db["rx"]["reconnects"])
    over = ("since start" if status["rates_since_start"]
            else f"over {status['rate_window_seconds']:.1f}s")
    lines = [
        f"agent: {status['peer'] or '?'}",
        f"  mode: {status['mode'] or '?'}",
        f"  version: {status['version'] or '?'}",
        f"  uptime: {_duration(status['uptime_seconds'])}",
        f"  database: tx {_updown(db['tx']['up'])}, rx {_updown(db['rx']['up'])}"
        f" ({reconnects} reconnect{'' if reconnects == 1 else 's'})",
        f"  queue: {_count(status['queue_packets'])} packets",
    ]
    ins = status["inserts"]
    lines.append(f"  inserts ({over}): {_num(ins['batches_per_second'])} batches/s, "
                 f"{_num(ins['packets_per_batch'])} packets/batch, latency p50 "
                 f"{_ms(ins['latency_p50_seconds'])}, p99 {_ms(ins['latency_p99_seconds'])}")
    dl = status["delivery"]
    lines.append(f"  delivery latency ({over}): p50 {_ms(dl['latency_p50_seconds'])}, "
                 f"p99 {_ms(dl['latency_p99_seconds'])}")
    drops = [f"{reason} {int(n)}" for reason, n in status["drops"].items() if n]
    lines.append(f"  drops: {', '.join(drops) if drops else 'none'}")
    for p in status["peers"]:
        lines += [
            "",
            f"peer: {p['name']}",
            f"  transfer: {_bytes(p['rx_bytes'])} received, {_bytes(p['tx_bytes'])} sent",
            f"  rate ({over}): {_bits(p['rx_bits_per_second'])} "
            f"({_num(p['rx_packets_per_second'])} packets/s) received, "
            f"{_bits(p['tx_bits_per_second'])} ({_num(p['tx_packets_per_second'])} "
            "packets/s) sent",
            f"  latest packet: received {_ago(p['last_rx_seconds_ago'])}, "
            f"sent {_ago(p['last_tx_seconds_ago'])}",
        ]
        if p["lag_packets"] is not None:
            lines.append(f"  lag: {_count(p['lag_packets'])} packets, {_ms(p['lag_seconds'])}")
    return "\n".join(lines)


def run(url: str, interval: float = 1.0, as_json: bool = False) -> str:
    first = scrape(url)
    second = None
    started = time.monotonic()
    if interval > 0:
        time.sleep(interval)
        second = scrape(url)
    status = summarize(first, second, time.monotonic() - started)
    status["url"] = url
    if as_json:
        return json.dumps(status, indent=2)
    return render(status)


# -- samples -----------------------------------------------------------------------------------

def _matches(labels: Labels, want: dict[str, str]) -> bool:
    have = dict(labels)
    return all(have.get(k) == v for k, v in want.items())


def _sum(samples: Samples, name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and _matches(lab, labels))


def _one(samples: Samples, name: str, **labels: str) -> float | None:
    for (n, lab), v in samples.items():
        if n == name and _matches(lab, labels):
            return v
    return None


def _labels_of(samples: Samples, name: str) -> dict[str, str]:
    return next((dict(lab) for (n, lab) in samples if n == name), {})


def _mean(last: Samples, base: Samples, histogram: str) -> float | None:
    count = _sum(last, histogram + "_count") - _sum(base, histogram + "_count")
    total = _sum(last, histogram + "_sum") - _sum(base, histogram + "_sum")
    return total / count if count > 0 else None


def _quantile(q: float, last: Samples, base: Samples, histogram: str) -> float | None:
    """histogram_quantile() of the observations between the two scrapes."""
    name = histogram + "_bucket"
    buckets = sorted((float(dict(lab)["le"]), v - base.get((n, lab), 0.0))
                     for (n, lab), v in last.items() if n == name)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count
                                                                                 - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


# -- formatting --------------------------------------------------------------------------------

def _updown(up: bool) -> str:
    return "up" if up else "DOWN"


def _count(value: float | None) -> str:
    return "?" if value is None else str(int(value))


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.2f} ms"


def _scaled(value: float, units: tuple[str, ...], step: float) -> str:
    i = 0
    while value >= step and i < len(units) - 1:
        value /= step
        i += 1
    return f"{value:.0f} {units[i]}" if i == 0 else f"{value:.2f} {units[i]}"


def _bytes(value: float) -> str:
    return _scaled(value, ("B", "KiB", "MiB", "GiB", "TiB"), 1024)


def _bits(per_second: float | None) -> str:
    if per_second is None:
        return "-"
    return _scaled(per_second, ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"), 1000)


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    return " ".join([*parts, f"{minutes}m", f"{s}s"])
