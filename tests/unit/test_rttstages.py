"""bench/rttstages.py: an echo's captured path cut into contiguous stages."""

from __future__ import annotations

import pytest

from bench.rttstages import Echo, Frame, round_trips

TX = {0: 40000, 1: 41000}  # senders' client ports
RX = {0: 40001, 1: 41001}  # receivers'


def _direction(src: int, t: float, carried: bool) -> list[Frame]:
    """A packet's database traffic from peer `src`, starting `t`."""
    dst = 1 - src
    frames = [Frame(t + 0.0004, src, TX[src], True, ("Bind", "Execute", "Sync")),
              Frame(t + 0.0014, dst, RX[dst], False, ("Notification",)),
              Frame(t + 0.0015, src, TX[src], False, ("Command completion",))]
    if not carried:
        frames += [Frame(t + 0.0018, dst, RX[dst], True, ("Bind", "Execute", "Sync")),
                   Frame(t + 0.0021, dst, RX[dst], False, ("Data row",))]
    return frames


def _trip(seq: int, t: float, carried: bool = False) -> tuple[list[Echo], list[Frame]]:
    echoes = [Echo(t, 0, seq, False, True), Echo(t + 0.0022, 1, seq, False, False),
              Echo(t + 0.0023, 1, seq, True, True), Echo(t + 0.0045, 0, seq, True, False)]
    return echoes, _direction(0, t, carried) + _direction(1, t + 0.0023, carried)


@pytest.mark.parametrize("carried", [False, True], ids=["fetched", "carried"])
def test_stages_are_contiguous_and_add_up_to_the_round_trip(carried):
    echoes, frames = _trip(1, 100.0, carried)
    (trip,) = round_trips(echoes, list(reversed(frames)))
    assert trip["total"] == pytest.approx(0.0045)
    assert trip["out.sender"] == pytest.approx(0.0004)
    assert trip["out.commit"] == pytest.approx(0.0010)
    assert trip["kernel"] == pytest.approx(0.0001)
    if carried:
        assert trip["out.fetch"] == trip["out.deliver"] == 0
        assert trip["out.receiver"] == pytest.approx(0.0008)
    else:
        assert trip["out.receiver"] == pytest.approx(0.0004)
        assert trip["out.fetch"] == pytest.approx(0.0003)
        assert trip["out.deliver"] == pytest.approx(0.0001)
    parts = sum(v for k, v in trip.items() if k != "total")
    assert parts == pytest.approx(trip["total"])


def test_an_echo_with_a_missing_sighting_or_frame_is_left_out():
    e1, f1 = _trip(1, 100.0)
    e2, f2 = _trip(2, 100.1)
    e3, f3 = _trip(3, 100.2)
    f3 = [f for f in f3 if not (f.peer == 1 and "Notification" in f.kinds)]  # lost wake-up
    trips = round_trips(e1 + e2[:3] + e3, f1 + f2 + f3)  # echo 2's reply never came back
    assert len(trips) == 1 and trips[0]["total"] == pytest.approx(0.0045)


def test_connections_it_cannot_tell_apart_are_an_error():
    echoes, frames = _trip(1, 100.0)
    extra = Frame(100.01, 0, 40002, True, ("Query",))  # a third session of peer 0
    with pytest.raises(ValueError, match="peer 0: expected one sending"):
        round_trips(echoes, [*frames, extra])
