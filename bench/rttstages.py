"""Where an idle ping's round trip goes: one echo's path through both agents and the database,
cut into stages from packet captures (the two TUN devices and the agents' PostgreSQL
connections, one clock), by `bench.rtt`.

Pure logic: events in, stages out (tests/unit/test_rttstages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# One direction of the tunnel, in the order a packet meets them. With a sealed pair a small
# batch rides in its notification and there is no fetch: "fetch" is then 0 and "receiver agent"
# runs from the notification to the TUN write.
STAGES = (
    ("sender", "sender agent: TUN read to statement sent"),
    ("commit", "database: statement to the receiver's notification (commit, WAL flush, wake-up)"),
    ("receiver", "receiver agent: notification to fetch sent"),
    ("fetch", "database: the fetch's round trip"),
    ("deliver", "receiver agent: rows to the TUN write"),
)
KERNEL = "kernel: echo request in to echo reply out"


@dataclass(frozen=True)
class Frame:
    """A captured PostgreSQL message frame on an agent's connection."""

    at: float
    peer: int  # 0: the pinging peer, 1: the pinged one
    port: int  # the agent's (client) port of the connection
    to_server: bool
    kinds: tuple[str, ...]  # tshark's pgsql.type names


@dataclass(frozen=True)
class Echo:
    """An ICMP echo seen on a TUN: `outgoing` from the kernel into the agent."""

    at: float
    peer: int
    seq: int
    reply: bool
    outgoing: bool


def roles(frames: list[Frame]) -> dict[int, dict[str, int]]:
    """Each peer's sender and receiver connection by client port: the receiver is the one
    that gets notifications, the sender the other one that sends statements."""
    out: dict[int, dict[str, int]] = {}
    for peer in (0, 1):
        mine = [f for f in frames if f.peer == peer]
        rx = {f.port for f in mine if "Notification" in f.kinds}
        tx = {f.port for f in mine if f.to_server} - rx
        if len(rx) != 1 or len(tx) != 1:
            raise ValueError(f"peer {peer}: expected one sending and one notified connection, "
                             f"found senders {sorted(tx)} and receivers {sorted(rx)}")
        out[peer] = {"sender": tx.pop(), "receiver": rx.pop()}
    return out


def _first(frames: list[Frame], after: float, before: float, peer: int, port: int,
           to_server: bool, kind: str | None = None) -> Frame | None:
    for f in frames:
        if (after <= f.at < before and f.peer == peer and f.port == port
                and f.to_server == to_server and (kind is None or kind in f.kinds)):
            return f
    return None


def direction(frames: list[Frame], ports: dict[int, dict[str, int]], src: int, left: float,
              arrived: float) -> dict[str, float] | None:
    """Stages (seconds) of one packet from peer `src`'s TUN at `left` to the other peer's
    TUN at `arrived`; None if its frames are not all there (another packet's batch carried
    it, or the capture missed one)."""
    dst = 1 - src
    sent = _first(frames, left, arrived, src, ports[src]["sender"], True)
    if sent is None:
        return None
    woken = _first(frames, sent.at, arrived, dst, ports[dst]["receiver"], False, "Notification")
    if woken is None:
        return None
    fetch = _first(frames, woken.at, arrived, dst, ports[dst]["receiver"], True)
    rows = fetch and _first(frames, fetch.at, arrived, dst, ports[dst]["receiver"], False)
    stages = {"sender": sent.at - left, "commit": woken.at - sent.at}
    if fetch is None or rows is None:  # carried in the notification
        stages.update(receiver=arrived - woken.at, fetch=0.0, deliver=0.0)
    else:
        stages.update(receiver=fetch.at - woken.at, fetch=rows.at - fetch.at,
                      deliver=arrived - rows.at)
    return stages


def round_trips(echoes: list[Echo], frames: list[Frame]) -> list[dict[str, float]]:
    """Every echo whose four TUN sightings and both directions' frames were captured:
    {"out.<stage>", "kernel", "back.<stage>", "total"} in seconds."""
    frames = sorted(frames, key=lambda f: f.at)
    ports = roles(frames)
    seen: dict[tuple[int, int, bool, bool], float] = {}
    for e in echoes:
        seen.setdefault((e.seq, e.peer, e.reply, e.outgoing), e.at)
    out = []
    for seq in sorted({e.seq for e in echoes}):
        times = [seen.get(k) for k in ((seq, 0, False, True), (seq, 1, False, False),
                                       (seq, 1, True, True), (seq, 0, True, False))]
        if any(t is None for t in times):
            continue
        asked, arrived, answered, back = (t for t in times if t is not None)
        there = direction(frames, ports, 0, asked, arrived)
        home = direction(frames, ports, 1, answered, back)
        if there is None or home is None:
            continue
        trip = {f"out.{k}": v for k, v in there.items()}
        trip.update({f"back.{k}": v for k, v in home.items()})
        trip.update(kernel=answered - arrived, total=back - asked)
        out.append(trip)
    return out
