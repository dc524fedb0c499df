"""The delay gate on its own, with a hand-driven clock."""
from __future__ import annotations

from tuneserve.service.admission import DelayGate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gate_closes_on_a_standing_queue_and_reopens_when_it_drains():
    clock = Clock()
    gate = DelayGate(bound_s=0.5, window_s=1.0, clock=clock)
    assert gate.open() and gate.min_recent_delay() is None  # nothing finished yet: admit
    for delay in (0.7, 0.9, 0.6):  # every recent request took longer than the bound
        gate.record(clock.now - delay)
        clock.now += 0.1
    assert not gate.open() and abs(gate.min_recent_delay() - 0.6) < 1e-9
    gate.record(clock.now - 0.2)  # one fast completion: the queue is not standing
    assert gate.open()


def test_a_burst_with_some_fast_answers_passes():
    clock = Clock()
    gate = DelayGate(bound_s=0.5, window_s=1.0, clock=clock)
    for delay in (0.05, 0.9, 1.2, 0.8):
        gate.record(clock.now - delay)
    assert gate.open()


def test_old_completions_are_forgotten():
    clock = Clock()
    gate = DelayGate(bound_s=0.5, window_s=1.0, clock=clock)
    gate.record(clock.now - 2.0)
    assert not gate.open()
    clock.now += 1.5  # no completion within the last second: no evidence of a queue
    assert gate.open() and gate.min_recent_delay() is None
