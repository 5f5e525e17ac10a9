"""`pgvpn status`: from two scrapes of an agent's metrics to a summary, as text and as data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgvpn_agent import status
from pgvpn_agent.config import ConfigError

NOW = 1_700_000_000.0


def exposition(rx_bytes: float, tx_bytes: float, batches: float, inserts: list[float],
               drops: float = 0, db_rx_up: int = 1) -> str:
    """An agent's exposition, cut down to what status reads; inserts: cumulative bucket counts
    for le = 0.001, 0.01, +Inf."""
    buckets = "".join(f'pgvpn_insert_duration_seconds_bucket{{le="{le}"}} {n}\n'
                      for le, n in zip(("0.001", "0.01", "+Inf"), inserts, strict=True))
    return f"""\
# TYPE process_start_time_seconds gauge
process_start_time_seconds {NOW - 3725}
# TYPE pgvpn_build_info gauge
pgvpn_build_info{{python="3.11.2",version="0.1.0"}} 1.0
# TYPE pgvpn_agent_info gauge
pgvpn_agent_info{{mode="logged",peer="office"}} 1.0
# TYPE pgvpn_packets_total counter
pgvpn_packets_total{{direction="rx",peer="branch"}} {rx_bytes / 1000}
pgvpn_packets_total{{direction="tx",peer="branch"}} {tx_bytes / 1000}
pgvpn_packets_total{{direction="rx",peer="cloud"}} 0
pgvpn_packets_total{{direction="tx",peer="cloud"}} 0
# TYPE pgvpn_bytes_total counter
pgvpn_bytes_total{{direction="rx",peer="branch"}} {rx_bytes}
pgvpn_bytes_total{{direction="tx",peer="branch"}} {tx_bytes}
pgvpn_bytes_total{{direction="rx",peer="cloud"}} 0
pgvpn_bytes_total{{direction="tx",peer="cloud"}} 0
# TYPE pgvpn_last_packet_timestamp_seconds gauge
pgvpn_last_packet_timestamp_seconds{{direction="rx",peer="branch"}} {NOW - 0.5}
pgvpn_last_packet_timestamp_seconds{{direction="tx",peer="branch"}} {NOW - 2}
# TYPE pgvpn_packets_dropped_total counter
pgvpn_packets_dropped_total{{reason="no_route"}} {drops}
pgvpn_packets_dropped_total{{reason="queue_full"}} 0
# TYPE pgvpn_insert_batches_total counter
pgvpn_insert_batches_total {batches}
# TYPE pgvpn_insert_batch_size_packets histogram
pgvpn_insert_batch_size_packets_count {batches}
pgvpn_insert_batch_size_packets_sum {batches * 4}
# TYPE pgvpn_insert_duration_seconds histogram
{buckets}pgvpn_insert_duration_seconds_count {inserts[-1]}
pgvpn_insert_duration_seconds_sum 1.0
# TYPE pgvpn_queue_depth_packets gauge
pgvpn_queue_depth_packets 3
# TYPE pgvpn_cursor_lag_packets gauge
pgvpn_cursor_lag_packets{{peer="branch"}} 12
# TYPE pgvpn_cursor_lag_seconds gauge
pgvpn_cursor_lag_seconds{{peer="branch"}} 0.25
# TYPE pgvpn_db_up gauge
pgvpn_db_up{{direction="tx"}} 1
pgvpn_db_up{{direction="rx"}} {db_rx_up}
# TYPE pgvpn_db_reconnects_total counter
pgvpn_db_reconnects_total{{direction="tx"}} 1
pgvpn_db_reconnects_total{{direction="rx"}} 2
"""


FIRST = status.parse(exposition(1_000_000, 2_000_000, 100, [50, 90, 100]))
SECOND = status.parse(exposition(1_250_000, 2_500_000, 300, [150, 280, 300], drops=7,
                                 db_rx_up=0))


def test_rates_come_from_the_difference_of_two_scrapes():
    s = status.summarize(FIRST, SECOND, elapsed=2.0, now=NOW)
    assert s["peer"] == "office" and s["mode"] == "logged" and s["version"] == "0.1.0"
    assert s["uptime_seconds"] == pytest.approx(3725)
    assert not s["rates_since_start"]
    branch, cloud = s["peers"]
    assert branch["name"] == "branch" and cloud["name"] == "cloud"
    assert branch["rx_bits_per_second"] == pytest.approx(250_000 * 8 / 2)
    assert branch["tx_bits_per_second"] == pytest.approx(500_000 * 8 / 2)
    assert branch["rx_packets_per_second"] == pytest.approx(125)
    assert branch["rx_bytes"] == 1_250_000
    assert branch["last_rx_seconds_ago"] == pytest.approx(0.5)
    assert branch["lag_packets"] == 12 and branch["lag_seconds"] == 0.25
    assert cloud["last_rx_seconds_ago"] is None and cloud["lag_packets"] is None
    assert s["inserts"]["batches_per_second"] == pytest.approx(100)
    # 200 inserts between the scrapes: 100 under 1 ms, 90 more under 10 ms
    assert s["inserts"]["latency_p50_seconds"] == pytest.approx(0.001)
    assert 0.001 < s["inserts"]["latency_p99_seconds"] <= 0.01 + 1e-12
    assert s["inserts"]["packets_per_batch"] == pytest.approx(4)
    assert s["delivery"]["latency_p50_seconds"] is None  # no such histogram in this scrape
    assert s["drops"] == {"no_route": 7, "queue_full": 0}
    assert s["database"] == {"tx": {"up": True, "reconnects": 1},
                             "rx": {"up": False, "reconnects": 2}}
    assert s["queue_packets"] == 3


def test_one_scrape_gives_averages_since_start():
    s = status.summarize(SECOND, now=NOW)
    assert s["rates_since_start"]
    assert s["peers"][0]["rx_bits_per_second"] == pytest.approx(1_250_000 * 8 / 3725)
    assert s["inserts"]["latency_p50_seconds"] == pytest.approx(0.001)


def test_text_reads_like_wg_show():
    text = status.render(status.summarize(FIRST, SECOND, elapsed=2.0, now=NOW))
    assert text.splitlines()[:6] == [
        "agent: office",
        "  mode: logged",
        "  version: 0.1.0",
        "  uptime: 1h 2m 5s",
        "  database: tx up, rx DOWN (3 reconnects)",
        "  queue: 3 packets",
    ]
    assert "  drops: no_route 7" in text
    assert "peer: branch" in text and "peer: cloud" in text
    assert "  transfer: 1.19 MiB received, 2.38 MiB sent" in text
    assert "  rate (over 2.0s): 1.00 Mbit/s (125 packets/s) received, 2.00 Mbit/s" in text
    assert "  latest packet: received 0.5s ago, sent 2.0s ago" in text
    assert "  lag: 12 packets, 250 ms" in text
    assert "  latest packet: received never, sent never" in text


def test_json_is_the_summary():
    s = status.summarize(FIRST, SECOND, elapsed=2.0, now=NOW)
    assert json.loads(json.dumps(s)) == s


def test_url_from_config(tmp_path: Path):
    def cfg(metrics: str) -> Path:
        path = tmp_path / "pgvpn.toml"
        path.write_text(f"""peer = "a"
[database]
dsn = "dbname=pgvpn"
[metrics]
{metrics}
[[peers]]
name = "a"
addresses = ["10.77.0.1/24"]
[[peers]]
name = "b"
addresses = ["10.77.0.2/24"]
""")
        return path

    assert status.url_from_config(cfg("")) == "http://127.0.0.1:9478/metrics"
    assert status.url_from_config(cfg('address = "::"\nport = 9100')) == \
        "http://[::1]:9100/metrics"
    assert status.url_from_config(cfg('address = "10.0.0.5"')) == "http://10.0.0.5:9478/metrics"
    with pytest.raises(ConfigError, match=r"metrics\.enabled is false"):
        status.url_from_config(cfg("enabled = false"))
    assert status.locate("http://x:1/metrics", None) == "http://x:1/metrics"


def test_an_unreachable_agent_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"cannot read metrics from .*is the agent running"):
        status.scrape("http://127.0.0.1:9/metrics", timeout=2)
