"""The `pgvpn` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import psycopg

from pgvpn_agent import config as configuration
from pgvpn_agent import logquery, seal

log = logging.getLogger("pgvpn")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except (configuration.ConfigError, logquery.FilterError, RuntimeError, OSError) as exc:
        print(f"pgvpn: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.Error as exc:
        print(f"pgvpn: database error: {str(exc).strip()}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgvpn", description="An IP tunnel through PostgreSQL.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", required=True, type=Path)
    run.set_defaults(func=_run)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(required=True)
    check = cfg.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", type=Path)
    check.add_argument("path", nargs="?", type=Path, help="(same as --config)")
    check.set_defaults(func=_config_check)
    keygen = sub.add_parser("keygen", help="print a new key for a pair of peers' keys files "
                            "(payload encryption at rest)")
    keygen.set_defaults(func=_keygen)

    dbp = sub.add_parser("db", help="the database: schema, peers, housekeeping").add_subparsers(
        required=True)
    for name, text in (("init", "install the schema in an empty database"),
                       ("migrate", "bring the schema to this agent's version (idempotent)")):
        c = dbp.add_parser(name, help=text)
        c.add_argument("--dsn", required=True, help="libpq conninfo of a superuser")
        c.add_argument("--owner", default=None,
                       help="NOLOGIN role to own the pgvpn schema (default pgvpn_owner)")
        c.add_argument("--target", type=int, help="stop at this schema version")
        c.set_defaults(func=_db_migrate)
    reg = dbp.add_parser("register", help="register peers by name (with links to every other "
                         "registered peer); agents do not register themselves")
    reg.add_argument("--dsn", required=True, help="libpq conninfo of pgvpn_operator or a "
                     "superuser")
    reg.add_argument("names", nargs="+", metavar="NAME")
    reg.set_defaults(func=_db_register)
    rev = dbp.add_parser("revoke", help="cut a peer off now: no login, sessions ended, its "
                         "login maps to no peer (its rows stay)")
    rev.add_argument("--dsn", required=True, help="libpq conninfo of a superuser")
    rev.add_argument("--peer", required=True)
    rev.set_defaults(func=_db_revoke)
    rem = dbp.add_parser("remove", help="remove a peer for good: its links, cursors and login "
                         "role (its rows stay; registering the name again brings it back)")
    rem.add_argument("--dsn", required=True, help="libpq conninfo of a superuser")
    rem.add_argument("name", metavar="NAME")
    rem.set_defaults(func=_db_remove)
    ref = dbp.add_parser("reference", help="print the schema reference (Markdown) of a "
                         "migrated database")
    ref.add_argument("--dsn", required=True)
    ref.set_defaults(func=_db_reference)
    ret = dbp.add_parser("retention", help="drop old log partitions now (by age and/or size)")
    ret.add_argument("--dsn", required=True, help="libpq conninfo of pgvpn_operator")
    ret.add_argument("--keep-days", type=int, help="drop days older than this")
    ret.add_argument("--max-size", help="drop oldest days while the log is larger, e.g. 50GB")
    ret.set_defaults(func=_db_retention)
    hk = dbp.add_parser("housekeeping", help="run the housekeeping service next to PostgreSQL: "
                        "partitions ahead, closed-day indexes, retention, free space, watchdog")
    hk.add_argument("--dsn", required=True, help="libpq conninfo of the housekeeping login "
                    "(member of pgvpn_operator, pg_monitor, pg_signal_backend)")
    hk.add_argument("--keep-days", type=int, help="drop days older than this")
    hk.add_argument("--max-size", help="drop oldest days while the log is larger, e.g. 50GB")
    hk.add_argument("--every", type=float, default=300.0, help="seconds between retention runs")
    hk.add_argument("--on-disk-full", choices=configuration.ON_DISK_FULL, default="drop_new",
                    help="drop_oldest: drop the oldest closed day while less than --min-free "
                    "is available where today's log is written")
    hk.add_argument("--min-free", default="1GB", help="free space drop_oldest keeps (default "
                    "1GB)")
    hk.add_argument("--max-transaction", type=float, default=60.0,
                    help="end peer sessions holding a transaction open longer than this many "
                    "seconds (0: off; default 60)")
    hk.add_argument("--metrics-address", default="127.0.0.1")
    hk.add_argument("--metrics-port", type=int, default=9480, help="0: no metrics endpoint")
    hk.set_defaults(func=_db_housekeeping)
    dbm = dbp.add_parser("metrics", help="serve database-side Prometheus metrics (log size, "
                         "disk, NOTIFY queue, role and replication); one next to each "
                         "PostgreSQL node")
    src = dbm.add_mutually_exclusive_group(required=True)
    src.add_argument("--dsn", help="libpq conninfo of a role with pg_monitor")
    src.add_argument("--config", type=Path, help="use [database] of this agent config")
    dbm.add_argument("--address", default="127.0.0.1")
    dbm.add_argument("--port", type=int, default=9479)
    dbm.set_defaults(func=_db_metrics)

    st = sub.add_parser("status", help="summary of a running agent, read from its metrics")
    where = st.add_mutually_exclusive_group()
    where.add_argument("--url", help="the agent's metrics URL")
    where.add_argument("--config", type=Path,
                       help="the agent's config (default /etc/pgvpn/pgvpn.toml, if present)")
    st.add_argument("--interval", type=float, default=1.0,
                    help="seconds between the two scrapes rates come from; 0: since start")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    sub.add_parser("bench", help="benchmark the transport variants beside OpenVPN "
                   "(see `pgvpn bench -h`); `pgvpn bench soak`: the database's limits; "
                   "`pgvpn bench mesh`: many peers at once against one pair; "
                   "`pgvpn bench mesh-long`: a mesh through a checkpoint and midnight; "
                   "`pgvpn bench rtt`: an idle round trip in stages beside its floor; "
                   "`pgvpn bench pagecache`: a new page of file cache against a cached one")

    filters = argparse.ArgumentParser(add_help=False)
    src = filters.add_mutually_exclusive_group()
    src.add_argument("--dsn", help="libpq conninfo (an operator role: pgvpn_reader); without "
                     "--dsn or --config, libpq's PG* environment and defaults, as for psql")
    src.add_argument("--config", type=Path, help="an agent's config: that peer's traffic only")
    filters.add_argument("--peer", help="either end is this peer")
    filters.add_argument("--src-peer")
    filters.add_argument("--dst-peer")
    filters.add_argument("--addr", help="either address is in this address or prefix")
    filters.add_argument("--port", type=int, help="either port")
    filters.add_argument("--proto", help="tcp, udp, icmp, icmpv6 or a number")
    filters.add_argument("--since", help="10m, 2h, 1d ago, or an ISO timestamp")
    filters.add_argument("--until", help="same forms as --since")
    log_p = sub.add_parser("log", parents=[filters], help="query the packet log")
    log_p.add_argument("--limit", type=int, default=100, help="rows (0: no limit)")
    log_p.add_argument("--json", action="store_true", help="one JSON object per line")
    log_p.set_defaults(func=_log)
    pcap_p = sub.add_parser("pcap", parents=[filters], help="export packets as a pcap file")
    pcap_p.add_argument("-o", "--output", default="-", help="file, or - for stdout")
    pcap_p.add_argument("--limit", type=int, default=0, help="packets (0: no limit)")
    pcap_p.set_defaults(func=_pcap)

    lab = sub.add_parser("lab", help="the tunnel on this machine, in network namespaces")
    labs = lab.add_subparsers(required=True)
    up = labs.add_parser("up", help="start a database and N peers; returns when all ping")
    up.add_argument("--peers", type=int, default=2)
    up.add_argument("--mode", choices=configuration.MODES, default="logged")
    up.add_argument("--batch-max", type=int)
    up.add_argument("--mtu", type=int, default=1500)
    up.add_argument("--encrypt", action="store_true", help="seal payloads at rest (keys per pair)")
    up.add_argument("--no-offload", dest="offload", action="store_false",
                    help="no TUN offload: one row per wire-sized packet")
    up.add_argument("--db-memory", type=int, default=0, metavar="MB",
                    help="PostgreSQL in a memory cgroup of MB, as a server whose memory is full "
                         "of cache (pgvpn_agent/labmemory.py; default 0: unconfined)")
    up.add_argument("--dir", type=Path, default=None, help="work dir (default /run/pgvpn-lab)")
    up.set_defaults(func=_lab_up)
    st = labs.add_parser("status", help="describe the running lab")
    st.add_argument("--json", action="store_true")
    st.add_argument("--dir", type=Path, default=None)
    st.set_defaults(func=_lab_status)
    down = labs.add_parser("down", help="remove everything the lab made")
    down.add_argument("--dir", type=Path, default=None)
    down.set_defaults(func=_lab_down)
    return p


def _bench(argv: list[str]) -> int:
    """The benchmark lives in the source tree's bench/, next to this package."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "tunnel.py").exists():
        print("pgvpn: error: `pgvpn bench` runs from a source checkout (bench/ not found)",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(root))
    logging.basicConfig(level=logging.WARNING)
    if argv[:1] == ["soak"]:
        from bench.soak import main as soak_main

        return soak_main(argv[1:])
    if argv[:1] == ["mesh-long"]:
        from bench.meshlong import main as mesh_long_main

        return mesh_long_main(argv[1:])
    if argv[:1] == ["mesh"]:
        from bench.mesh import main as mesh_main

        return mesh_main(argv[1:])
    if argv[:1] == ["rtt"]:
        from bench.rtt import main as rtt_main

        return rtt_main(argv[1:])
    if argv[:1] == ["pagecache"]:
        from bench.pagecache import main as pagecache_main

        return pagecache_main(argv[1:])
    from bench.tunnel import main as bench_main

    return bench_main(argv)


def _run(args: argparse.Namespace) -> int:
    from pgvpn_agent.agent import run

    return run(configuration.load(args.config))


def _config_check(args: argparse.Namespace) -> int:
    path = args.path or args.config
    if path is None:
        raise configuration.ConfigError("config check: give the file with --config FILE")
    cfg = configuration.load(path)
    sealer = seal.for_config(cfg)
    sealed = f", payloads sealed for {len(sealer.links)} peers" if sealer else ""
    print(f"{path}: ok (peer {cfg.peer}, mode {cfg.mode}, "
          f"{len(cfg.peers)} peers{sealed})")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    print(seal.new_key())
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    from pgvpn_agent import db, schema

    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-migrate") as conn:
        applied = schema.migrate(conn, owner=args.owner or schema.OWNER, target=args.target)
        version = schema.current_version(conn)
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema at {version}")
    else:
        print(f"schema already at version {version}")
    return 0


def _db_register(args: argparse.Namespace) -> int:
    from pgvpn_agent import admin, db

    for name in args.names:
        configuration.check_peer_name(name, "NAME")
    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-register") as conn:
        ids = admin.register(conn, args.names)
    print(" ".join(f"{name}={ids[name]}" for name in args.names))
    return 0


def _db_revoke(args: argparse.Namespace) -> int:
    from pgvpn_agent import admin, db

    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-revoke") as conn:
        revoked = admin.revoke(conn, args.peer)
    print(f"peer {args.peer} revoked: role {revoked.role} may not log in, "
          f"{revoked.sessions} sessions ended; rotate the pair keys it held (docs/deploy.md)")
    return 0


def _db_remove(args: argparse.Namespace) -> int:
    from pgvpn_agent import admin, db

    configuration.check_peer_name(args.name, "NAME")
    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-remove") as conn:
        removed = admin.remove(conn, args.name)
    role = "dropped" if removed.dropped else "gone already"
    print(f"peer {args.name} removed: links and cursors deleted, role {removed.role} {role}, "
          f"{removed.sessions} sessions ended; its rows stay in the log")
    return 0


def _db_reference(args: argparse.Namespace) -> int:
    from pgvpn_agent import db, reference

    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-reference") as conn:
        print(reference.render(conn), end="")
    return 0


def _db_housekeeping(args: argparse.Namespace) -> int:
    from pgvpn_agent import housekeeping

    raw = {"keep_days": args.keep_days, "max_size": args.max_size, "every": args.every,
           "on_disk_full": args.on_disk_full, "min_free": args.min_free}
    policy = configuration.parse_retention({k: v for k, v in raw.items() if v is not None})
    if args.max_transaction < 0:
        raise configuration.ConfigError("--max-transaction: seconds >= 0 (0: off)")
    return housekeeping.serve(configuration.Database(dsn=args.dsn), policy,
                              args.max_transaction, args.metrics_address,
                              args.metrics_port or None)


def _db_retention(args: argparse.Namespace) -> int:
    from pgvpn_agent import db
    from pgvpn_agent.housekeeping import apply_retention

    raw = {"keep_days": args.keep_days, "max_size": args.max_size}
    policy = configuration.parse_retention({k: v for k, v in raw.items() if v is not None})
    keep, max_bytes = policy.keep_days, policy.max_bytes
    if keep is None and max_bytes is None:
        raise configuration.ConfigError("retention: give --keep-days and/or --max-size")
    with db.connect(configuration.Database(dsn=args.dsn), "pgvpn-retention") as conn:
        dropped = apply_retention(conn, keep, max_bytes)
    for part, day, size, reason, undelivered in dropped:
        lost = f", {undelivered} rows never delivered" if undelivered else ""
        print(f"dropped {part} ({day}, {size / 1e6:.1f} MB) by {reason}{lost}")
    if not dropped:
        print("nothing to drop")
    return 0


def _db_metrics(args: argparse.Namespace) -> int:
    from pgvpn_agent import dbmetrics

    database = (configuration.load(args.config).database if args.config
                else configuration.Database(dsn=args.dsn))
    return dbmetrics.serve(database, args.address, args.port)


def _status(args: argparse.Namespace) -> int:
    from pgvpn_agent import status

    print(status.run(status.locate(args.url, args.config), args.interval, args.json))
    return 0


def _filter(args: argparse.Namespace) -> logquery.Filter:
    return logquery.Filter(
        peer=args.peer, src_peer=args.src_peer, dst_peer=args.dst_peer,
        addr=logquery.check_addr(args.addr) if args.addr else None, port=args.port,
        protocol=logquery.parse_protocol(args.proto) if args.proto else None,
        since=logquery.parse_time(args.since, "--since") if args.since else None,
        until=logquery.parse_time(args.until, "--until") if args.until else None,
        limit=args.limit or None)


def _log_conn(args: argparse.Namespace) -> Any:
    from pgvpn_agent import db

    database = (configuration.load(args.config).database if args.config
                else configuration.Database(dsn=args.dsn or ""))
    return db.connect(database, "pgvpn-log")


def _log(args: argparse.Namespace) -> int:
    f = _filter(args)
    with _log_conn(args) as conn:
        records = list(logquery.rows(conn, f))
    if args.json:
        for r in records:
            print(json.dumps(logquery.as_dict(r)))
    else:
        print(logquery.table(records))
    return 0


def _pcap(args: argparse.Namespace) -> int:
    from pgvpn_agent.pcap import PcapWriter

    f = _filter(args)
    # A peer's config opens what was sealed for that peer (its role reads only those rows).
    sealer = seal.for_config(configuration.load(args.config)) if args.config else None
    unsealable = 0
    out = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")  # noqa: SIM115
    try:
        writer = PcapWriter(out)
        with _log_conn(args) as conn:
            for r in logquery.rows(conn, f, payload=True):
                packet = bytes(r[-1])
                if sealer is not None:
                    try:
                        packet = sealer.open(r[2], r[4], packet)
                    except seal.Unsealable:
                        unsealable += 1
                        continue
                writer.write(r[1], packet)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if unsealable:
        print(f"{unsealable} sealed packets could not be opened with this peer's keys "
              "and were left out", file=sys.stderr)
    if args.output != "-":
        print(f"{writer.count} packets written to {args.output}", file=sys.stderr)
    return 0


def _lab_dir(args: argparse.Namespace) -> Path:
    from pgvpn_agent.lab import DEFAULT_DIR

    return Path(args.dir) if args.dir else DEFAULT_DIR


def _lab_up(args: argparse.Namespace) -> int:
    from pgvpn_agent.lab import Lab

    lab = Lab.create(_lab_dir(args), peers=args.peers, mode=args.mode, batch_max=args.batch_max,
                     mtu=args.mtu, encrypt=args.encrypt, offload=args.offload,
                     db_memory_mb=args.db_memory)
    lab.up()
    for peer in lab.peers:
        print(f"{peer.name}: ip netns exec {peer.netns} ping {peer.ipv4}  |  {peer.ipv6}")
    print(f"database: psql '{lab.dsn()}'")
    print("all peers reach each other; `pgvpn lab down` removes everything")
    return 0


def _lab_status(args: argparse.Namespace) -> int:
    from pgvpn_agent.lab import Lab

    status = Lab.load(_lab_dir(args)).status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(f"database: {status['dsn']}  mode: {status['mode']}")
        for p in status["peers"]:
            state = "running" if p["running"] else "STOPPED"
            print(f"  {p['name']:<10} {p['netns']:<14} {p['ipv4']:<12} {p['ipv6']:<10} {state}")
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from pgvpn_agent.lab import Lab

    Lab.load(_lab_dir(args)).down()
    print("lab removed")
    return 0
