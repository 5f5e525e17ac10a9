"""Payload mode, the seed's "cheat": packets ride inside NOTIFY payloads and nothing is logged.

A benchmark mode, refused unless `transport.allow_payload_mode` (config.py says why): any role
may LISTEN on the well-known channels it uses. Both halves live here, apart from the logged
path that sender.py and receiver.py are about.
"""

from __future__ import annotations

import base64
import binascii
import time

from pgvpn_agent import db, metrics, tun
from pgvpn_agent.packet import MalformedPacket, parse
from pgvpn_agent.routing import RouteTable
from pgvpn_agent.stopping import Stop, notifications

NOTIFY_PAYLOADS = "SELECT pg_notify(c, m) FROM unnest(%b::text[], %b::text[]) AS t (c, m)"
# Captured packet: capture time (sender clock) and the bytes read, offload header first.
Captured = tuple[float, bytes]


def encode(batch: list[Captured], routes: RouteTable, ids: dict[str, int]
           ) -> tuple[list[str], list[str], dict[int, list[int]]]:
    """Channels and messages for a batch, and packets and bytes per destination id."""
    channels: list[str] = []
    messages: list[str] = []
    counts: dict[int, list[int]] = {}
    malformed = no_route = 0
    for sent_at, raw in batch:
        packet = raw[tun.VNET_SIZE:]  # zeros: payload mode runs without TUN offload
        try:
            h = parse(packet)
        except MalformedPacket:
            malformed += 1
            continue
        peer = routes.lookup(h.dst_raw)
        if peer is None or peer not in ids:
            no_route += 1
            continue
        channels.append("pgvpn_" + peer)
        messages.append(f"{sent_at:.6f} {base64.b64encode(packet).decode()}")
        c = counts.setdefault(ids[peer], [0, 0])
        c[0] += 1
        c[1] += h.length
    if malformed:
        metrics.DROPPED.labels("malformed").inc(malformed)
    if no_route:
        metrics.DROPPED.labels("no_route").inc(no_route)
    return channels, messages, counts


def send(conn: db.Conn, channels: list[str], messages: list[str]) -> None:
    with conn.transaction():
        conn.execute(NOTIFY_PAYLOADS, (channels, messages), prepare=True)


def deliver(conn: db.Conn, device: tun.Tun, timeout: float, max_age: float,
            stop: Stop) -> None:
    """Write the packets of the notifications that arrive within `timeout`."""
    n = size = stale = bad = 0
    delivered: list[float] = []  # ages at the write: notifications arrive one by one
    for note in notifications(conn, timeout, stop):
        stamp, _, data = note.payload.partition(" ")
        try:
            sent_at = float(stamp)
            packet = base64.b64decode(data, validate=True)
        except (ValueError, binascii.Error):
            bad += 1
            continue
        # the sender's clock against this one: payload mode has no row, hence no database time
        age = time.time() - sent_at
        if age > max_age:
            stale += 1
        elif device.write(packet):
            n += 1
            size += len(packet)
            delivered.append(age)
    if bad:
        metrics.DROPPED.labels("malformed").inc(bad)
    if stale:
        metrics.DROPPED.labels("too_old").inc(stale)
    if n:
        metrics.PACKETS.labels("rx", "any").inc(n)
        metrics.BYTES.labels("rx", "any").inc(size)
        metrics.LAST_PACKET.labels("rx", "any").set(time.time())
        metrics.DELIVERY_SECONDS.observe_batch(delivered)
