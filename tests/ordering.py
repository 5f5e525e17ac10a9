"""What a fault test may and may not see of a numbered stream, checked in order, not as sets.

`walk` replays the arrivals of one link against the log of that link (datagram numbers in
sequence order). Each arrival must be the next logged datagram, or a rewind: the receiver,
restarted, delivering again from an earlier row (the row after its last saved cursor). Anything
else — a datagram not in the log, a skipped row, an arrival ahead of its turn — fails at once,
naming where.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Walk:
    delivered: int = 0  # distinct logged datagrams that arrived
    repeats: int = 0  # arrivals of a datagram that had arrived before
    # (index the receiver went back to, index it had reached) for every re-delivery
    rewinds: list[tuple[int, int]] = field(default_factory=list)


def walk(received: list[int], logged: list[int]) -> Walk:
    """Replay `received` against `logged`; AssertionError names the first arrival out of turn."""
    assert len(logged) == len(set(logged)), "a datagram was logged twice"
    assert logged == sorted(logged), "the log holds the datagrams out of their sending order"
    where = {n: i for i, n in enumerate(logged)}
    result = Walk()
    reached = 0  # index of the next datagram never delivered
    at = 0  # index of the datagram expected next
    for k, n in enumerate(received):
        i = where.get(n)
        assert i is not None, f"arrival {k}: datagram {n} was delivered but never logged"
        if i == at:
            at += 1
        elif i < at:
            result.rewinds.append((i, reached))
            at = i + 1
        else:
            raise AssertionError(f"arrival {k}: datagram {n} came when {logged[at]} was due: "
                                 f"{i - at} logged datagrams skipped or reordered")
        if at > reached:
            reached = at
        else:
            result.repeats += 1
    assert reached == len(logged), (
        f"logged but never delivered: {logged[reached:reached + 10]} "
        f"({len(logged) - reached} in all)")
    result.delivered = reached
    return result
