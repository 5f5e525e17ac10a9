"""The `pgvpn` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pgvpn_agent import config as configuration

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
    except (configuration.ConfigError, RuntimeError, OSError) as exc:
        print(f"pgvpn: error: {exc}", file=sys.stderr)
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

    dbp = sub.add_parser("db", help="database schema").add_subparsers(required=True)
    for name, text in (("init", "install the schema in an empty database"),
                       ("migrate", "bring the schema to this agent's version (idempotent)")):
        c = dbp.add_parser(name, help=text)
        src = c.add_mutually_exclusive_group(required=True)
        src.add_argument("--dsn", help="libpq conninfo of a role that may create the schema")
        src.add_argument("--config", type=Path, help="use [database] of this agent config")
        c.add_argument("--owner", help="role to own the pgvpn schema")
        c.set_defaults(func=_db_migrate)

    sub.add_parser("bench", help="benchmark the transport variants (see `pgvpn bench -h`)")

    lab = sub.add_parser("lab", help="the tunnel on this machine, in network namespaces")
    labs = lab.add_subparsers(required=True)
    up = labs.add_parser("up", help="start a database and N peers; returns when all ping")
    up.add_argument("--peers", type=int, default=2)
    up.add_argument("--mode", choices=configuration.MODES, default="logged")
    up.add_argument("--batch-max", type=int)
    up.add_argument("--mtu", type=int, default=1500)
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
    print(f"{path}: ok (peer {cfg.peer}, mode {cfg.mode}, "
          f"{len(cfg.peers)} peers)")
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    from pgvpn_agent import db, schema

    database = (configuration.load(args.config).database if args.config
                else configuration.Database(dsn=args.dsn))
    with db.connect(database, "pgvpn-migrate") as conn:
        applied = schema.migrate(conn, owner=args.owner)
    if applied:
        print(f"applied migrations {', '.join(map(str, applied))}; schema at {schema.LATEST}")
    else:
        print(f"schema already at version {schema.LATEST}")
    return 0


def _lab_dir(args: argparse.Namespace) -> Path:
    from pgvpn_agent.lab import DEFAULT_DIR

    return Path(args.dir) if args.dir else DEFAULT_DIR


def _lab_up(args: argparse.Namespace) -> int:
    from pgvpn_agent.lab import Lab

    lab = Lab.create(_lab_dir(args), peers=args.peers, mode=args.mode, batch_max=args.batch_max,
                     mtu=args.mtu)
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
