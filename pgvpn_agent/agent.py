"""`pgvpn run`: one TUN device, one sender thread, one receiver thread, clean shutdown.

Housekeeping (partitions, retention) is not the agent's: a peer's login may not run it
(`pgvpn db housekeeping` on the database host does).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from pgvpn_agent import faults, metrics
from pgvpn_agent.config import Config, Retention
from pgvpn_agent.delivered import Delivered
from pgvpn_agent.receiver import Receiver
from pgvpn_agent.sender import Sender
from pgvpn_agent.stopping import Stop
from pgvpn_agent.tun import configure, open_tun

log = logging.getLogger(__name__)


def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until a worker thread dies unexpectedly (exit 1)."""
    if config.mode == "payload":
        log.warning(
            "PAYLOAD MODE: packets travel inside NOTIFY payloads and NOTHING IS LOGGED; any "
            "database user may LISTEN on the channels and read them. This is a benchmark mode."
        )
    if config.database.insecure:
        log.warning(
            "DATABASE TLS NOT VERIFIED: database.allow_plaintext is set and sslmode is %s; "
            "the database server is not authenticated, so whoever is on the path can read or "
            "change passwords and packets. Use sslmode = \"verify-full\" with sslrootcert.",
            config.database.sslmode,
        )
    if config.retention != Retention():
        log.warning("[retention] in the agent's config is ignored: retention runs in the "
                    "housekeeping service on the database host (`pgvpn db housekeeping`, "
                    "Ansible: pgvpn_postgresql_retention_*); remove the section")
    if faults.ARMED:
        log.warning("%s is set: this agent kills itself at %s (fault tests only)", faults.ENV,
                    faults.ARMED)
    tun = open_tun(config.tun.name, offload=config.tun.offload)
    stop = Stop()
    failed = threading.Event()
    try:
        me = config.me
        configure(
            tun,
            mtu=config.tun.mtu,
            txqueuelen=config.tun.txqueuelen,
            addresses=me.addresses,
            routes=[net for p in config.others for net in p.prefixes()],
        )
        metrics.start(config)
        _on_signals(lambda: stop.set())
        delivered = Delivered()  # receiver cursors a sender's batch may carry
        sender = Sender(config, tun, stop, delivered)
        receiver = Receiver(config, tun, stop, delivered)
        workers = [
            threading.Thread(target=_guard(sender.run, stop, failed), name="sender"),
            threading.Thread(target=_guard(receiver.run, stop, failed),
                             name="receiver"),
        ]
        for w in workers:
            w.start()
        log.info("peer %s up on %s (%s)", config.peer, tun.name,
                 ", ".join(str(a) for a in me.addresses))
        stop.wait()
        for w in workers:
            w.join()
    finally:
        stop.set()
        tun.close()
    log.info("peer %s stopped, %s removed", config.peer, config.tun.name)
    return 1 if failed.is_set() else 0


def _guard(target: Callable[[], None], stop: Stop,
           failed: threading.Event) -> Callable[[], None]:
    """A worker that dies takes the agent down with it: systemd restarts a whole agent."""

    def run() -> None:
        try:
            target()
        except BaseException:
            log.exception("%s thread crashed; stopping the agent", threading.current_thread().name)
            failed.set()
            stop.set()

    return run


def _on_signals(handler: Callable[[], None]) -> None:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        handler()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
