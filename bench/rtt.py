"""`pgvpn bench rtt`: an idle round trip beside its floor on this machine.

The floor is what no design that logs a packet durably before delivering it can beat here: a
WAL flush (`pg_test_fsync`, the server's `wal_sync_method`), and on the lab's own PostgreSQL one
direction as the seed did it (INSERT and pg_notify, the listener woken, the row read back by
id) and as a carried row does (the row rides in the notification: no read). Twice that is a
round trip's floor, measured back to back. An idle ping's floor is two flushes each after a
pause (`paused_flush_us`): on a virtual disk far dearer than back to back. Beside it, pings
through the seed's Go program (bench/seed_go) and through `pgvpn lab` (agents on TCP, so that
their database traffic can be captured), idle ones (tunnel.PING_INTERVAL apart) and
back-to-back ones (`ping -A`); each idle pgvpn ping is cut into stages (bench/rttstages.py)
from captures of both TUN devices and both agents' connections on one clock. Variants
alternate, round-robin.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from bench import rttreport, tunnel
from bench.rttstages import Echo, Frame, round_trips
from bench.testbeds import Variant, testbed
from bench.tunnel import RESULTS, percentile, ping_ms
from pgvpn_agent.lab import Lab, LabError

# key: sealed payloads (None: the seed's Go program, whose round trip is not cut into stages),
# and unsealed rows boxed in their notification (pgvpn.limits.carry_unsealed, schema v15)
VARIANTS: dict[str, tuple[bool | None, bool]] = {
    "seed-go": (None, False), "logged": (False, False), "logged-boxed": (False, True),
    "logged-sealed": (True, False)}
FLOOR_ROUNDS = 200


def fsync_us(lab: Lab) -> dict[str, Any]:
    """pg_test_fsync's one-8kB-write figure for the server's wal_sync_method, in the lab's data
    directory's file system (stopped after that first section), and the same flush after an
    idle ping's pause (`paused_flush_us`)."""
    method = lab.psql("SHOW wal_sync_method")
    probe = lab.pgdir / "fsync-probe"
    proc = subprocess.Popen([f"{lab.pg_bin}/pg_test_fsync", "-s", "1", "-f", str(probe)],
                            stdout=subprocess.PIPE, text=True)
    found = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.match(rf"\s+{method}\s+[\d.]+ ops/sec\s+(\d+) usecs/op", line)
            if m:
                found = float(m.group(1))
                break
    finally:
        proc.kill()
        proc.wait()
        probe.unlink(missing_ok=True)
    if found is None:
        raise LabError(f"pg_test_fsync printed no figure for wal_sync_method = {method}")
    return {"method": method, "us": found, **paused_flush_us(probe, method)}


# open flags and the call after each write, per wal_sync_method (Linux)
SYNC_METHODS: dict[str, tuple[int, Any]] = {
    "fdatasync": (0, os.fdatasync), "fsync": (0, os.fsync),
    "open_datasync": (os.O_DSYNC, None), "open_sync": (os.O_SYNC, None)}
PAUSED_FLUSHES = 30
FILE_BYTES = 16 << 20  # a WAL segment


def paused_flush_us(path: Path, method: str) -> dict[str, float]:
    """Median microseconds of one durable 8 kB write (as the server flushes its WAL: in place,
    into a file already written), back to back and each after tunnel.PING_INTERVAL of quiet.

    pg_test_fsync measures only the first. An idle ping's two commits each come after a pause,
    and on a virtual disk that flush can cost ten times as much (1.0-1.2 ms against 0.09-0.13
    back to back on the VM of 2026-12-05): that, twice, is the floor of an idle round trip for
    any design that logs each packet durably before it delivers it, the seed's included."""
    if method not in SYNC_METHODS:
        raise LabError(f"wal_sync_method = {method}: no way to time it here")
    flags, sync = SYNC_METHODS[method]
    block = os.urandom(8192)
    with path.open("wb") as f:  # written and flushed once: later writes overwrite it in place
        f.write(bytes(FILE_BYTES))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        warm = _flushes(fd, sync, block, 10 * PAUSED_FLUSHES, 0)
        paused = _flushes(fd, sync, block, PAUSED_FLUSHES, tunnel.PING_INTERVAL)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"warm_us": warm, "paused_us": paused}


def _flushes(fd: int, sync: Any, block: bytes, n: int, pause: float) -> float:
    """Median microseconds of n durable writes of `block`, each after `pause` seconds."""
    took = []
    for i in range(n):
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        os.pwrite(fd, block, i * len(block) % FILE_BYTES)
        if sync is not None:
            sync(fd)
        took.append(time.perf_counter() - started)
    return statistics.median(took) * 1e6


def floor_ms(lab: Lab, rounds: int) -> dict[str, float]:
    """Median milliseconds of one direction, the seed's way and the carried way, on the lab's
    PostgreSQL over the agents' path to it (TCP, or its socket; a scratch database, superuser).

    Back to back: it is the floor of back-to-back pings. (The same rounds 50 ms apart cost 2.8
    times as much here, but through a Python client that is itself cold after each pause: the
    seed's Go program pinged faster than that, so it is no floor for idle pings.)"""
    host = lab.peers[0].mgmt_host if lab.tcp else str(lab.sockdir)
    base = f"host={host} port={lab.port} user=postgres"
    with psycopg.connect(f"{base} dbname=postgres", autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS rttfloor")
        admin.execute("CREATE DATABASE rttfloor")
    try:
        with psycopg.connect(f"{base} dbname=rttfloor", autocommit=True) as tx, \
                psycopg.connect(f"{base} dbname=rttfloor", autocommit=True) as rx:
            tx.execute("CREATE TABLE packet (id bigserial PRIMARY KEY, payload bytea)")
            rx.execute("LISTEN floor")
            payload = os.urandom(84)  # an idle ping's IPv4 packet
            logged, carried, commit = [], [], []
            for _ in range(rounds):
                started = time.perf_counter()
                tx.execute("INSERT INTO packet (payload) VALUES (%b)", (payload,), prepare=True)
                commit.append(time.perf_counter() - started)
                started = time.perf_counter()
                tx.execute("WITH i AS (INSERT INTO packet (payload) VALUES (%b) RETURNING id) "
                           "SELECT pg_notify('floor', id::text) FROM i", (payload,),
                           prepare=True)
                note = next(rx.notifies(timeout=5, stop_after=1))
                carried.append(time.perf_counter() - started)
                rx.execute("SELECT payload FROM packet WHERE id = %b", (int(note.payload),),
                           prepare=True).fetchone()
                logged.append(time.perf_counter() - started)
    finally:
        with psycopg.connect(f"{base} dbname=postgres", autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS rttfloor")
    return {"commit": statistics.median(commit) * 1e3,
            "logged": statistics.median(logged) * 1e3,
            "carried": statistics.median(carried) * 1e3}


@contextmanager
def capture(lab: Lab, workdir: Path) -> Iterator[list[Path]]:
    """dumpcap on both TUNs (ICMP) and the agents' management links (PostgreSQL)."""
    files = [workdir / "tun1.pcapng", workdir / "tun2.pcapng", workdir / "db.pcapng"]
    a, b = lab.peers[:2]
    cmds = [["ip", "netns", "exec", a.netns, "dumpcap", "-q", "-i", a.tun, "-f", "icmp",
             "-w", str(files[0])],
            ["ip", "netns", "exec", b.netns, "dumpcap", "-q", "-i", b.tun, "-f", "icmp",
             "-w", str(files[1])],
            ["dumpcap", "-q", "-i", a.mgmt_if, "-i", b.mgmt_if, "-f", f"tcp port {lab.port}",
             "-w", str(files[2])]]
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for c in cmds]
    try:
        for f, p in zip(files, procs, strict=True):
            deadline = time.monotonic() + 10
            while not f.exists() and p.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if not f.exists():
                err = p.stderr.read().decode() if p.poll() is not None and p.stderr else ""
                raise LabError(f"dumpcap did not start: {err.strip() or 'timed out'}")
        time.sleep(0.5)
        yield files
    finally:
        time.sleep(0.3)
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait(timeout=10)


def _tshark(path: Path, *fields: str, decode: str = "") -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields", "-E", "aggregator=,"]
    if decode:
        cmd += ["-d", decode]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def parse(lab: Lab, files: list[Path]) -> tuple[list[Echo], list[Frame]]:
    echoes = []
    for peer, path in enumerate(files[:2]):
        for at, kind, seq, src in _tshark(path, "frame.time_epoch", "icmp.type", "icmp.seq",
                                          "ip.src"):
            if kind in ("0", "8") and seq:
                reply = kind == "0"
                # outgoing: sent by this namespace's kernel into the TUN
                mine = src == lab.peers[peer].ipv4
                echoes.append(Echo(float(at), peer, int(seq), reply, mine))
    ifaces = {lab.peers[0].mgmt_if: 0, lab.peers[1].mgmt_if: 1}
    frames = []
    for at, iface, sport, dport, length, kinds in _tshark(
            files[2], "frame.time_epoch", "frame.interface_name", "tcp.srcport", "tcp.dstport",
            "tcp.len", "pgsql.type", decode=f"tcp.port=={lab.port},pgsql"):
        if int(length or 0) == 0:
            continue
        to_server = int(dport) == lab.port
        frames.append(Frame(float(at), ifaces[iface], int(sport if to_server else dport),
                            to_server, tuple(kinds.split(","))))
    return echoes, frames


def measure(variant: tuple[bool | None, bool], pings: int, workdir: Path) -> dict[str, Any]:
    """One fresh lab: the floor, then idle pings, captured and cut into stages (pgvpn)."""
    sealed, boxed = variant
    pid = os.getpid()
    prefix, port = f"pgvr{pid}-", 58000 + pid % 1000
    if sealed is None:
        with testbed(seed_go_variant(), workdir / "lab", prefix, port) as bed:
            return {"sealed": False, "fsync": fsync_us(bed.lab),
                    "floor_ms": floor_ms(bed.lab, FLOOR_ROUNDS),
                    "ping_ms": ping_ms(bed.lab, pings),
                    "ping_warm_ms": ping_ms(bed.lab, pings, back_to_back=True),
                    "trips": []}
    lab = Lab.create(workdir / "lab", prefix=prefix, port=port, tcp=True, encrypt=sealed)
    try:
        lab.up()
        if boxed:
            lab.psql("UPDATE pgvpn.limits SET carry_unsealed = true")
        fsync = fsync_us(lab)
        floor = floor_ms(lab, FLOOR_ROUNDS)
        with capture(lab, workdir) as files:
            rtts = ping_ms(lab, pings)
        warm = ping_ms(lab, pings, back_to_back=True)
        echoes, frames = parse(lab, files)
        trips = round_trips(echoes, frames)
    finally:
        lab.down()
    return {"sealed": sealed, "boxed": boxed, "fsync": fsync, "floor_ms": floor, "ping_ms": rtts,
            "ping_warm_ms": warm, "trips": trips}


def seed_go_variant() -> Variant:
    return next(v for v in tunnel.VARIANTS if v.key == "seed-go")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pgvpn bench rtt", description=__doc__)
    p.add_argument("--pings", type=int, default=60, help="idle pings per lab (default 60)")
    p.add_argument("--reps", type=int, default=2, help="labs per variant (default 2)")
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="variants to run")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"output dir (default {RESULTS})")
    args = p.parse_args(argv)
    for tool in ("dumpcap", "tshark"):
        if shutil.which(tool) is None:
            p.error(f"`{tool}` is not installed (apt-get install tshark)")
    keys = args.only or list(VARIANTS)
    meta = {"pings": args.pings, "reps": args.reps, "loadavg_before": os.getloadavg()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for rep in range(args.reps):
            for key in keys:
                with tempfile.TemporaryDirectory(prefix="pgvpn-rtt-", dir="/tmp") as tmp:
                    os.chmod(tmp, 0o755)
                    run = measure(VARIANTS[key], args.pings, Path(tmp))
                run.update(key=key, rep=rep + 1)
                runs.append(run)
                print(f"pgvpn bench rtt: {key} rep {rep + 1}/{args.reps}: ping p50 "
                      f"{percentile(run['ping_ms'], 0.5)} ms, {len(run['trips'])} round trips "
                      f"cut into stages ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    except LabError as exc:
        print(f"pgvpn bench rtt: error: {exc}", file=sys.stderr)
        return 2
    meta["loadavg_after"] = os.getloadavg()[0]
    print(rttreport.markdown(runs))
    for path in rttreport.write(runs, meta, args.out):
        print(path, file=sys.stderr)
    return 0
