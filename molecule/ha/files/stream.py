#!/usr/bin/env python3
"""Numbered datagrams through the tunnel, and what became of them.

    stream.py send HOST PORT --rate 200 --seconds 40 --out send.json
    stream.py recv PORT --seconds 45 --out recv.json
    stream.py analyze send.json recv.json --fault-at EPOCH [--logged N]

Each datagram carries its number and send time. The sender ends with a few datagrams to
PORT + END_PORT (not counted among the stream's in the log); the receiver keeps every arrival
(number, time) until GRACE seconds after the first of them (a late repeat would still be
seen), or until --seconds pass. The analysis says how many were sent, received, repeated,
out of order, lost, the longest silence and when the first datagram arrived after the fault.
Machines of one lab share the host's clock, so times compare across them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import select
import socket
import struct
import sys
import time

HEADER = struct.Struct("!Qd")
END_PORT = 1000  # the end of a stream to PORT goes to PORT + END_PORT
GRACE = 3.0


def send(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    padding = b"\0" * max(0, args.size - HEADER.size)
    interval = 1.0 / args.rate
    start = time.time()
    seq = unroutable = 0
    next_at = start
    while time.time() - start < args.seconds:
        seq += 1
        try:
            sock.sendto(HEADER.pack(seq, time.time()) + padding, (args.host, args.port))
        except OSError:
            # No route while the agent restarts (its TUN device and routes go with it): the
            # datagram is numbered and counts as lost, as one the tunnel dropped.
            unroutable += 1
        next_at += interval
        delay = next_at - time.time()
        if delay > 0:
            time.sleep(delay)
    for _ in range(3):  # the same link as the rest, so in order behind them
        with contextlib.suppress(OSError):
            sock.sendto(HEADER.pack(seq, time.time()), (args.host, args.port + END_PORT))
    with open(args.out, "w") as f:
        json.dump({"sent": seq, "unroutable": unroutable, "start": start, "end": time.time()}, f)


def recv(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A tunnel back from an outage delivers what queued up at once: room for all of it, and
    # the kernel's count of what the socket still dropped (not the tunnel's doing).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("0.0.0.0", args.port))
    sock.setblocking(False)
    ends = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ends.bind(("0.0.0.0", args.port + END_PORT))
    dropped_before = _socket_drops()
    arrivals: list[tuple[int, float]] = []
    end = time.time() + args.seconds
    while (left := end - time.time()) > 0:
        ready, _, _ = select.select([sock, ends], [], [], min(left, 0.5))
        if ends in ready:
            ends.recv(65536)
            end = min(end, time.time() + GRACE)
        while sock in ready:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                break
            if len(data) >= HEADER.size:
                arrivals.append((HEADER.unpack_from(data)[0], time.time()))
    with open(args.out, "w") as f:
        json.dump({"arrivals": arrivals, "socket_drops": _socket_drops() - dropped_before}, f)


def _socket_drops() -> int:
    """UDP datagrams this host's sockets dropped for a full receive buffer (RcvbufErrors)."""
    with open("/proc/net/snmp") as f:
        names, values = [line.split() for line in f if line.startswith("Udp:")][:2]
    return int(values[names.index("RcvbufErrors")])


def analyze(args: argparse.Namespace) -> None:
    with open(args.send) as f:
        sent = json.load(f)
    with open(args.recv) as f:
        received = json.load(f)
    arrivals = received["arrivals"]
    seen: set[int] = set()
    repeated = out_of_order = 0
    highest = 0
    for seq, _ in arrivals:
        if seq in seen:
            repeated += 1
        elif seq < highest:
            out_of_order += 1
        seen.add(seq)
        highest = max(highest, seq)
    times = [t for _, t in arrivals]
    gaps = sorted(((b - a, a, b) for a, b in itertools.pairwise(times)), reverse=True)
    longest = gaps[0] if gaps else (0.0, 0.0, 0.0)
    fault = args.fault_at
    after = [t for t in times if t > fault]
    # The silence the fault caused: the longest gap that ends after it; under half a second,
    # none (the first datagram after the fault is then the first new one).
    outage = max((g for g in gaps if g[2] > fault), default=(0.0, fault, 0.0))
    if outage[0] < 0.5:
        outage = (0.0, fault, after[0] if after else 0.0)
    result = {
        "label": args.label,
        "sent": sent["sent"],
        "received": len(arrivals),
        "unique": len(seen),
        "repeated": repeated,
        "out_of_order": out_of_order,
        "lost": sent["sent"] - len(seen),
        "unroutable": sent.get("unroutable", 0),
        "longest_silence_s": round(longest[0], 3),
        "outage_s": round(outage[0], 3),
        "fault_to_first_new_s": round(outage[2] - fault, 3) if outage[2] else None,
        "received_after_fault": len(after),
        "socket_drops": received.get("socket_drops", 0),
    }
    if args.logged is not None:
        result["logged"] = args.logged
        result["logged_not_received"] = args.logged - len(seen)
    json.dump(result, sys.stdout)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("send")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--size", type=int, default=200)
    p.add_argument("--out", required=True)
    p = sub.add_parser("recv")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=45.0)
    p.add_argument("--out", required=True)
    p = sub.add_parser("analyze")
    p.add_argument("send")
    p.add_argument("recv")
    p.add_argument("--fault-at", type=float, required=True)
    p.add_argument("--logged", type=int)
    p.add_argument("--label", default="")
    args = parser.parse_args()
    {"send": send, "recv": recv, "analyze": analyze}[args.cmd](args)


if __name__ == "__main__":
    main()
